"""The committed etc/hostfw/agent.conf.sample is what oslo-config-generator makes now.

A new or changed option without `tox -e genconfig` (or the command in the
failure message) fails here, so the sample operators copy never lies. The
sample depends on the installed oslo.log and oslo.messaging too: setup.cfg caps
them below their next minor release, and raising a cap means regenerating it.

oslo-config-validator checks that the etc/ samples (and any agent.conf) name
only options that exist; the values are checked by their types when the agent
starts (tests/unit/test_config.py): the validator does not read values.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONF = ROOT / "etc/oslo-config-generator/hostfw-agent.conf"
SAMPLE = ROOT / "etc/hostfw/agent.conf.sample"


def generator(name: str = "oslo-config-generator") -> str:
    venv = ROOT / ".venv/bin" / name
    return str(venv if venv.exists() else Path(sys.executable).parent / name)


def test_committed_sample_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "agent.conf.sample"
    subprocess.run([generator(), "--config-file", str(GENERATOR_CONF),
                    "--output-file", str(fresh)], check=True, capture_output=True,
                   cwd=ROOT, timeout=120)
    want, have = fresh.read_text(), SAMPLE.read_text()
    diff = "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                        "committed", "generated", n=1))
    assert want == have, (f"etc/hostfw/agent.conf.sample is stale; run `tox -e genconfig` "
                          f"or `{generator()} --config-file {GENERATOR_CONF}`:\n{diff}")


def test_sample_documents_every_hostfw_option_with_its_running_default() -> None:
    sections: dict[str, set[str]] = {}
    current = ""
    for line in SAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line):
            current = match.group(1)
        elif match := re.match(r"#(\w+) =( |$)", line):
            sections.setdefault(current, set()).add(match.group(1))
    for group, opts in config.list_opts():
        assert {o.dest for o in opts} <= sections.get(group, set()), group
    text = SAMPLE.read_text()
    assert "\n#use_stderr = true\n" in text          # hostfw logs to stderr (journald)
    assert "\n#control_exchange = neutron\n" in text  # Neutron's exchange (CONTRACT 5)
    assert "[metrics]\n" in text and "\n#listen =" in text


def test_sample_documents_the_value_types() -> None:
    text = SAMPLE.read_text().replace("\n# ", " ")   # help paragraphs on one line each
    for option, kind in (("metadata_host", "IP address value"),
                         ("routing_source_ip", "IP address value")):
        assert re.search(rf"\(({kind})\)\n#{option} =", text), option
    assert "(port value) Minimum value: 1 Maximum value: 65535\n#metadata_port = 8775" in text
    assert "at most 12 characters. (string value)\n#chain_prefix = hostfw" in text
    assert "one bit of 32, in hex" in text


def validator(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([generator("oslo-config-validator"), "--config-file",
                           str(GENERATOR_CONF), "--input-file", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("sample", ["agent.conf.example", "agent.conf.sample"])
def test_oslo_config_validator_accepts_the_samples(sample: str) -> None:
    proc = validator(ROOT / "etc/hostfw" / sample)
    assert proc.returncode == 0, proc.stderr


def test_oslo_config_validator_rejects_an_unknown_option(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("[firewall]\nchain_prefx = hostfw\n")
    proc = validator(conf)
    assert proc.returncode == 1
    assert "firewall/chain_prefx is not part of the sample config" in proc.stderr

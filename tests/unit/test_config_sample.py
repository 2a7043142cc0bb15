"""The committed etc/hostfw/agent.conf.sample is what oslo-config-generator makes now.

A new or changed option without `tox -e genconfig` (or the command in the
failure message) fails here, so the sample operators copy never lies. The
sample depends on the installed oslo.log and oslo.messaging too: upgrading
them means regenerating it.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

from agent import config

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONF = ROOT / "etc/oslo-config-generator/hostfw-agent.conf"
SAMPLE = ROOT / "etc/hostfw/agent.conf.sample"


def generator() -> str:
    venv = ROOT / ".venv/bin/oslo-config-generator"
    return str(venv if venv.exists() else Path(sys.executable).parent / "oslo-config-generator")


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

"""The console scripts as an operator runs them: --version, bad configuration, logs.

Nothing here needs root or a kernel: each command exits (or is stopped) before
it would touch a firewall, and the controller's broker address is a closed
loopback port.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from agent import FALLBACK_VERSION, version
from tests.support.agent import ROOT, tool

# setuptools-scm's forms: 1.2.0 (on a tag), 1.2.1.dev5+g<hash>[.d<date>] (after one).
SCM_VERSION = re.compile(r"^\d+(\.\d+)*(\.dev\d+)?(\+g(?P<hash>[0-9a-f]{7,})(\.d\d{8})?)?$")


@pytest.mark.parametrize("prog", ["hostfw-agent", "agent-ctl", "hostfw-controller"])
def test_version_prints_the_installed_version(prog: str) -> None:
    proc = subprocess.run([tool(prog), "--version"], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr.count("Traceback")) == (
        0, f"{prog} {version()}\n", 0), proc.stderr


def test_the_version_comes_from_git() -> None:
    """The installed version names a commit (or tag) of this repository."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the fallback version is expected")
    installed = version()
    assert installed != FALLBACK_VERSION, "installed without git metadata"
    match = SCM_VERSION.match(installed)
    assert match, installed
    if match["hash"]:
        found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                                f"{match['hash']}^{{commit}}"], capture_output=True)
    else:
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q",
                                f"refs/tags/{installed}"], capture_output=True)
    assert found.returncode == 0, f"{installed} names no commit or tag of {ROOT}"


def test_a_bad_value_exits_2_with_a_reason_not_a_traceback(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nmode = standalone\n[firewall]\nconntrack_zones = maybe\n"
                    f"[admin]\nsocket_path = {tmp_path}/agent.sock\n"
                    "[nat]\nfixed_range = 10.0.0.0/24\nmetadata_host = ::1\n")
    proc = subprocess.run([tool("hostfw-agent"), "--config-file", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "hostfw-agent: [firewall] conntrack_zones: Unexpected boolean value 'maybe'" in lines
    assert "hostfw-agent: [nat] metadata_host: ::1 is not an IPv4 address" in lines


def test_controller_logs_through_oslo_log(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("ports: []\nsecurity_groups: {}\n")
    conf = tmp_path / "controller.conf"
    conf.write_text("[DEFAULT]\ntransport_url = rabbit://guest:guest@127.0.0.1:1/\n"
                    f"[controller]\npolicy_file = {policy}\n")
    err = tmp_path / "stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen([tool("hostfw-controller"), "--debug", "--config-file",
                                 str(conf)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while "serving" not in err.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(15)
    text = err.read_text()
    # agent.config.LOG_FORMAT, as the agent's: time.ms pid LEVEL logger [thread] message
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \d+ INFO hostfw\.controller "
                     rf"\[MainThread\] serving {re.escape(str(policy))}: 0 ports",
                     text, re.MULTILINE), text

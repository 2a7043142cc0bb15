"""The DevStack plugin (devstack/plugin.sh, devstack/settings) without a DevStack.

`bash -n` and shellcheck catch syntax and the usual shell traps; running the
phases against stub DevStack functions (which only record their arguments)
checks the wiring: which config options get written, which process starts,
as whom. Nothing here runs as root or touches the network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "devstack" / "plugin.sh", ROOT / "devstack" / "settings"]

# DevStack's functions as stubs that log their arguments; its variables as a
# compute node of a Linux bridge deployment would have them.
STUBS = r"""
LOG=$1; WORK=$2; shift 2
function enable_service { ENABLED="${ENABLED:-} $1"; }
function is_service_enabled { [[ " ${ENABLED:-} " == *" $1 "* ]]; }
function echo_summary { :; }
function die { echo "die: $*" >> "$LOG"; exit 1; }
function warn { echo "warn: $*" >> "$LOG"; }
function iniset { echo "iniset $*" >> "$LOG"; }
function get_transport_url { echo "rabbit://stackrabbit:secret@192.0.2.1:5672/"; }
function run_process { echo "run_process $*" >> "$LOG"; }
function stop_process { echo "stop_process $*" >> "$LOG"; }
function pip_install { echo "pip_install $*" >> "$LOG"; }
function sudo { echo "sudo $*" >> "$LOG"; }
DEST=$WORK/opt; DATA_DIR=$WORK/data; STACK_USER=stack; Q_AGENT=${Q_AGENT-linuxbridge}
Q_PLUGIN_CONF_FILE=etc/neutron/plugins/ml2/ml2_conf.ini
HOSTFW_CONF_DIR=$WORK/etc; HOSTFW_HOST=compute1
source "$ROOT/devstack/settings"
source "$ROOT/devstack/plugin.sh" "$@"
"""


def test_bash_syntax() -> None:
    proc = subprocess.run(["bash", "-n", *map(str, FILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", "-s", "bash", *map(str, FILES)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def phase(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run plugin.sh with `args` on the stubs; the stubs' log, one call a line."""
    log = tmp_path / "calls.log"
    log.write_text("")
    (tmp_path / "etc").mkdir(exist_ok=True)  # `sudo install -d` is a stub
    proc = subprocess.run(["bash", "-c", STUBS, "stubs", str(log), str(tmp_path), *args],
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ROOT": str(ROOT), **(env or {})})
    calls = log.read_text().splitlines()
    assert proc.returncode == (1 if any(c.startswith("die:") for c in calls) else 0), \
        proc.stderr
    return calls


def test_post_config_writes_the_agent_config_and_silences_neutrons_firewall(tmp_path) -> None:
    calls = phase(tmp_path, "stack", "post-config")
    conf = tmp_path / "etc" / "agent.conf"
    assert f"iniset {conf} DEFAULT transport_url rabbit://stackrabbit:secret@192.0.2.1:5672/" \
        in calls
    assert f"iniset {conf} agent mode rpc" in calls
    assert f"iniset {conf} DEFAULT host compute1" in calls
    assert f"iniset {conf} DEFAULT state_path {tmp_path}/data/hostfw" in calls
    assert "iniset /etc/neutron/plugins/ml2/ml2_conf.ini securitygroup firewall_driver noop" \
        in calls
    assert "sudo modprobe br_netfilter" in calls
    assert conf.stat().st_mode & 0o777 == 0o600  # it will hold the broker's password
    assert not any(c.startswith("warn:") for c in calls)


def test_post_config_for_ml2_ovs_selects_the_hostfw_driver(tmp_path) -> None:
    """ML2/OVS: the OVS agent's driver is the shim that asks for hybrid plugging."""
    calls = phase(tmp_path, "stack", "post-config", env={"Q_AGENT": "openvswitch"})
    assert "iniset /etc/neutron/plugins/ml2/ml2_conf.ini securitygroup firewall_driver hostfw" \
        in calls
    assert "sudo modprobe br_netfilter" in calls
    assert not any(c.startswith(("warn:", "die:")) for c in calls)


@pytest.mark.parametrize("agent", ["ovn", ""])
def test_post_config_stops_where_hostfw_cannot_enforce(tmp_path, agent: str) -> None:
    calls = phase(tmp_path, "stack", "post-config", env={"Q_AGENT": agent})
    assert calls[-1].startswith("die:") and "Q_AGENT=openvswitch or linuxbridge" in calls[-1]
    assert not any("firewall_driver" in c for c in calls)


def fake_tools(tmp_path: Path) -> dict[str, str]:
    """A python that passes the version check and a venv pip, both logging."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python3.12"
    python.write_text("#!/bin/sh\nexit 0\n")
    pip = tmp_path / "opt" / "hostfw-venv" / "bin" / "pip"
    pip.parent.mkdir(parents=True, exist_ok=True)
    pip.write_text(f"#!/bin/sh\necho \"venv-pip $*\" >> {log}\n")
    for tool in (python, pip):
        tool.chmod(0o755)
    return {"HOSTFW_PYTHON": str(python)}


@pytest.mark.parametrize(("agent", "shim"), [("openvswitch", True), ("linuxbridge", False)])
def test_install_puts_the_shim_into_neutrons_python_for_ovs_only(tmp_path, agent: str,
                                                                 shim: bool) -> None:
    calls = phase(tmp_path, "stack", "install", env={"Q_AGENT": agent, **fake_tools(tmp_path)})
    clone = tmp_path / "opt" / "hostfw"
    assert f"venv-pip install --quiet {clone}" in calls
    want = f"pip_install --no-deps --ignore-requires-python {clone}"
    assert (want in calls) is shim, calls


def test_extra_starts_the_agent_as_root_and_unstack_stops_it(tmp_path) -> None:
    venv = tmp_path / "opt" / "hostfw-venv"
    assert phase(tmp_path, "stack", "extra") == [
        f"run_process hostfw-agent {venv}/bin/hostfw-agent --config-file "
        f"{tmp_path}/etc/agent.conf  root"]
    assert phase(tmp_path, "unstack") == ["stop_process hostfw-agent"]
    assert phase(tmp_path, "clean") == [
        f"sudo rm -rf {tmp_path}/etc {tmp_path}/data/hostfw {venv}"]


def test_install_refuses_an_old_python(tmp_path) -> None:
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    calls = phase(tmp_path, "stack", "install", env={"HOSTFW_PYTHON": str(old)})
    assert len(calls) == 1 and calls[0].startswith("die:") and "Python 3.11" in calls[0]


def test_nothing_happens_when_the_service_is_disabled(tmp_path) -> None:
    script = STUBS.replace('source "$ROOT/devstack/plugin.sh"',
                           'ENABLED=""; source "$ROOT/devstack/plugin.sh"')
    log = tmp_path / "calls.log"
    log.write_text("")
    subprocess.run(["bash", "-c", script, "stubs", str(log), str(tmp_path), "stack", "extra"],
                   check=True, env={"PATH": "/usr/bin:/bin", "ROOT": str(ROOT)})
    assert log.read_text() == ""

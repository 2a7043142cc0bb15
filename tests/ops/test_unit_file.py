"""systemd/hostfw-agent.service: `systemd-analyze verify` is clean, and the unit
says what the agent relies on (notify, watchdog, reload, restart, sandbox).

verify also checks that ExecStart exists; the unit names the installed path
(/opt/hostfw/bin, doc/operations.md), so the check runs on a copy pointing at
this checkout's script. test_packaging.py checks that an install really puts
the script there.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.agent import ROOT, tool

UNIT = ROOT / "systemd/hostfw-agent.service"
INSTALL_PREFIX = "/opt/hostfw"  # doc/operations.md: python3 -m venv /opt/hostfw


def service_section() -> dict[str, list[str]]:
    """[Service] as key -> values (systemd keys repeat, so no configparser)."""
    seen: dict[str, list[str]] = {}
    current = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            seen.setdefault(key, []).append(value)
    return seen


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    agent = shutil.which(tool("hostfw-agent")) or tool("hostfw-agent")
    copy = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert f"{INSTALL_PREFIX}/bin/hostfw-agent " in text
    copy.write_text(text.replace(f"{INSTALL_PREFIX}/bin/hostfw-agent", agent))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_unit_declares_the_operations_contract() -> None:
    service = service_section()
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"]
    assert int(service["LimitNOFILE"][0]) >= 65536  # issue 14.7: room for applies
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/run/xtables.lock"]
    assert service["RuntimeDirectory"] == ["hostfw"] and service["StateDirectory"] == ["hostfw"]


def test_unit_does_not_restart_a_refused_configuration() -> None:
    # hostfw-agent exits 2 for a configuration it refuses (tests/ops/test_cli.py)
    assert service_section()["RestartPreventExitStatus"] == ["2"]


def test_log_dir_is_writable_under_protect_system_strict() -> None:
    service = service_section()
    assert service["ProtectSystem"] == ["strict"] and service["LogsDirectory"] == ["hostfw"]


def test_exec_start_is_the_documented_install() -> None:
    (exec_start,) = service_section()["ExecStart"]
    assert exec_start == f"{INSTALL_PREFIX}/bin/hostfw-agent --config-file /etc/hostfw/agent.conf"
    operations = (ROOT / "doc/operations.md").read_text()
    assert f"python3 -m venv {INSTALL_PREFIX}\n" in operations
    assert f"{INSTALL_PREFIX}/share/hostfw-agent/systemd/hostfw-agent.service" in operations

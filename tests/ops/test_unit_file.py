"""systemd/hostfw-agent.service: `systemd-analyze verify` is clean, and the unit
says what the agent relies on (notify, watchdog, reload, restart, sandbox).

verify also checks that ExecStart exists; the unit names the packaged path
(/usr/bin), so the check runs on a copy pointing at this checkout's script.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.agent import ROOT, tool

UNIT = ROOT / "systemd/hostfw-agent.service"


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
    copy.write_text(UNIT.read_text().replace("/usr/bin/hostfw-agent", agent))
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

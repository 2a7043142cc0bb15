"""Logging through oslo.log: stderr by default (journald under systemd), --debug works.

The agent is started by hand here (not AgentProcess.start) to pass --debug and
to keep stdout and stderr apart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.ops.helpers import policy
from tests.support.agent import AgentProcess, assert_root_clean, tool
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel


def test_debug_flag_and_stderr(topology: Topology, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, topology.node.ns, policy(topology.add_vm("a")))
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([tool("hostfw-agent"), "--debug", "--config-file",
                                 str(agent.conf_path)], stdout=stdout, stderr=stderr)
    try:
        agent.wait_for(lambda: "applied generation 1" in err.read_text(), timeout=15,
                       what="the first apply in the log")
    finally:
        proc.terminate()
        proc.wait(10)
        assert_root_clean()
    text = err.read_text()
    assert out.read_text() == ""
    assert " DEBUG agent.dataplane.engine [writer] commit " in text
    assert " INFO hostfw.agent [writer] applied generation 1" in text

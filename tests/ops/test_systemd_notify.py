"""The real hostfw-agent speaking the systemd notify protocol to a socket we bind.

The agent runs as `make test` runs it (standalone, managing a sandbox node
through `[agent] netns`) with NOTIFY_SOCKET and WATCHDOG_USEC in its
environment, as systemd would set them for `Type=notify` and `WatchdogSec=2`.
The writer is stalled for real by holding the agent's (private) xtables lock,
so its iptables-restore waits inside a kernel write.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ops.helpers import HeldLock, NotifyListener, policy
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import Topology

pytestmark = pytest.mark.kernel

WATCHDOG_SEC = 2.0


@dataclass
class Sandbox:
    topology: Topology
    agent: AgentProcess
    listener: NotifyListener
    lock: HeldLock
    env: dict[str, str]


@pytest.fixture
def sandbox(topology: Topology, tmp_path: Path) -> Iterator[Sandbox]:
    vms = [topology.add_vm("a"), topology.add_vm("b")]
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    lock = HeldLock(tmp_path / "xtables.lock")
    env = {"NOTIFY_SOCKET": listener.address,
           "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6)),
           "XTABLES_LOCKFILE": lock.path}
    agent = AgentProcess(tmp_path / "agent", topology.node.ns, policy(*vms))
    try:
        yield Sandbox(topology, agent, listener, lock, env)
    finally:
        lock.release()
        agent.stop()
        listener.close()
        assert_root_clean()


def status_when_up(agent: AgentProcess) -> dict | None:
    """The admin socket's status once it answers, else None."""
    try:
        return agent.request({"command": "status"})
    except OSError:
        return None


def test_ready_only_after_the_first_apply(sandbox: Sandbox) -> None:
    agent, listener = sandbox.agent, sandbox.listener
    sandbox.lock.acquire()                     # the first apply will block in the kernel write
    agent.start(wait=False, env=sandbox.env)
    status = agent.wait_for(lambda: status_when_up(agent), what="the admin socket")
    time.sleep(2.0)
    assert agent.request({"command": "status"})["generation"] == 0, status
    assert listener.lines("READY=1") == []
    assert listener.lines("STATUS=writer running")
    released = time.monotonic()
    sandbox.lock.release()
    ready_at = listener.wait_for("READY=1")
    assert ready_at > released
    assert agent.status()["generation"] >= 1
    ready_message = next(lines for _, lines in listener.messages if "READY=1" in lines)
    assert "STATUS=generation 1: 2 active ports, in sync" in ready_message


def test_watchdog_pings_about_every_half_interval(sandbox: Sandbox) -> None:
    sandbox.agent.start(env=sandbox.env)
    sandbox.listener.wait_for("READY=1")
    since = time.monotonic()
    time.sleep(5.0)
    pings = [at for at, _ in sandbox.listener.lines("WATCHDOG=1", since=since)]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert len(pings) >= 4, pings
    # half of WatchdogSec when idle (well inside it even on a loaded machine),
    # never closer than a quarter of it
    assert max(gaps) < WATCHDOG_SEC * 0.75, gaps
    assert min(gaps) >= WATCHDOG_SEC / 4 * 0.9, gaps


def test_a_stuck_writer_stops_the_pings(sandbox: Sandbox) -> None:
    """The pings come from the writer loop: while it hangs in iptables-restore
    the main thread still answers the admin socket, but no WATCHDOG=1 is sent,
    so systemd would restart the agent."""
    agent, listener = sandbox.agent, sandbox.listener
    vms = list(sandbox.topology.vms.values())
    agent.start(env=sandbox.env)
    listener.wait_for("READY=1")
    sandbox.lock.acquire()
    agent.write_policy(policy(*vms, open_port=80))  # a change: the apply must commit
    agent.request({"command": "resync"})
    time.sleep(0.5)                                 # the writer reaches the kernel write
    stalled = time.monotonic()
    generation = agent.status()["generation"]       # a drift check may have run before
    time.sleep(WATCHDOG_SEC * 1.5)
    assert listener.lines("WATCHDOG=1", since=stalled) == []
    assert agent.status()["generation"] == generation  # answered by the main thread
    released = time.monotonic()
    sandbox.lock.release()
    assert listener.wait_for("WATCHDOG=1", since=released, timeout=10) - released < 3.0
    listener.wait_for(f"STATUS=generation {generation + 1}:", since=released)


def test_abstract_socket_reload_and_stop(topology: Topology, tmp_path: Path) -> None:
    """An abstract NOTIFY_SOCKET works although the writer lives in the node's
    namespace; SIGHUP (ExecReload) re-reads the policy and the new state shows
    in STATUS=; SIGTERM sends STOPPING=1. Without WATCHDOG_USEC, no pings."""
    vms = [topology.add_vm("a"), topology.add_vm("b")]
    listener = NotifyListener(f"@hfwt-notify-{os.getpid()}-{secrets.token_hex(4)}")
    agent = AgentProcess(tmp_path, topology.node.ns, policy(*vms))
    try:
        agent.start(env={"NOTIFY_SOCKET": listener.address})
        listener.wait_for("READY=1")
        agent.write_policy(policy(vms[0]))   # the file source reads it on SIGHUP only
        reloaded = time.monotonic()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: any(line.endswith(": 1 active port, in sync") for _, line
                                   in listener.lines("STATUS=generation", since=reloaded)),
                       what=f"the status after the reload in {listener.lines('STATUS=')}")
        assert agent.stop() == 0
        listener.wait_for("STOPPING=1")
        assert listener.lines("WATCHDOG=1") == []
    finally:
        agent.stop()
        listener.close()
        assert_root_clean()

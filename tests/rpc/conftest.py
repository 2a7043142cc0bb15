"""Fixtures of the RPC tests: a private broker per session; per test a controller,
an agent and three VMs on one node namespace."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rpc.broker import Broker, running_broker, skip_reason
from tests.rpc.stack import ControllerProcess, RpcAgentProcess, Stack, base_policy
from tests.support.agent import assert_root_clean
from tests.support.topology import Topology


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A RabbitMQ node of this session's own, on loopback."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with running_broker() as broker:
        yield broker


def stop_together(*procs: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM all, then wait: their shutdowns (a few seconds each) overlap."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass   # the owners' stop() kills it


@pytest.fixture
def stack(topology: Topology, broker: Broker, tmp_path: Path) -> Iterator[Stack]:
    client = topology.add_vm("client")
    server = topology.add_vm("server")
    other = topology.add_vm("other")
    base = base_policy(client, server, other)
    controller = ControllerProcess(tmp_path, broker.url, base)
    agent = RpcAgentProcess(tmp_path, topology.node.ns, broker.url)
    stack = Stack(topology, controller, agent, base)
    try:
        controller.start()
        agent.start(wait=False)
        controller.wait_serving()
        agent.wait_converged(ports=3)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stop_together(agent.proc, controller.proc)
        agent.stop()
        controller.stop()
        assert_root_clean()

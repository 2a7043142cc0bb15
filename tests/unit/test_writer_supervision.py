"""The writer loop survives any exception from its work (issue 14.6), without a kernel.

Before, a ValueError from set planning, a bad bridge name, a read before the
first policy or a KeyError from zone allocation escaped `Agent._loop` and
ended the writer thread: the rules froze and systemd restart-looped the
agent. Now each is logged, counted (`hostfw_writer_errors_total`), makes
the agent not ready and unhealthy, and is retried with backoff; the kernel
keeps the last good rules. The apply is replaced by a stub that raises, so
the test needs no kernel and exercises the real loop, reconciler and metrics.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from oslo_config import cfg

from agent import config
from agent.daemon import Agent, Event
from agent.dataplane.command import KernelWriteError
from agent.dataplane.engine import ApplyReport
from agent.sources.base import PolicySource


class QuietSource(PolicySource):
    def start(self, deliver: Any) -> None:
        pass

    def resync(self) -> None:
        pass


def make_agent(tmp_path: Path) -> Agent:
    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf([], project="hostfw", default_config_files=[])
    conf.set_override("mode", "standalone", "agent")
    conf.set_override("policy_file", str(tmp_path / "policy.yaml"), "agent")
    return Agent(conf, QuietSource())


def counted(agent: Agent, kind: str) -> float:
    return agent.metrics.registry.get_sample_value("hostfw_writer_errors_total",
                                                   {"kind": kind}) or 0.0


@pytest.mark.parametrize(("error", "kind"), [
    (ValueError("set hfw4gx: unknown type 'bitmap:port'"), "internal"),   # set planning
    (ValueError("bad bridge name 'br-+'"), "internal"),
    (KeyError("zone pool exhausted"), "internal"),                        # zones.allocate
    (AttributeError("'NoneType' object has no attribute 'chains'"), "internal"),  # no view
    (KernelWriteError("iptables-restore exited 1: line 3 failed"), "kernel"),
])
def test_the_writer_survives_backs_off_and_recovers(tmp_path: Path, error: Exception,
                                                    kind: str) -> None:
    agent = make_agent(tmp_path)
    attempts: list[float] = []

    def apply(engine: Any, force: bool, verify: bool) -> ApplyReport:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise error
        return ApplyReport(in_sync=True)

    agent._apply = apply  # type: ignore[method-assign]
    writer = threading.Thread(target=agent._loop, args=(object(),), daemon=True)
    writer.start()
    agent.queue.put(Event("devices", {"tap1": "br0"}))
    try:
        deadline = time.monotonic() + 5
        while counted(agent, kind) < 1:
            assert time.monotonic() < deadline, "the error was not counted"
            time.sleep(0.01)
        assert writer.is_alive()
        ready, doc = agent.metrics.readiness()
        assert not ready and any("backing off" in p for p in doc["problems"])
        healthy, health = agent.metrics.health()
        assert not healthy and any("backing off" in p for p in health["problems"])
        assert str(error).strip("'") in (agent.state.apply_error or "")
        while len(attempts) < 2:      # retried after the backoff (1 s)
            assert time.monotonic() < deadline, "no retry after the backoff"
            time.sleep(0.01)
        assert attempts[1] - attempts[0] >= 0.9
        assert writer.is_alive()
    finally:
        agent.queue.put(Event("stop"))
        writer.join(5)
    assert not writer.is_alive()

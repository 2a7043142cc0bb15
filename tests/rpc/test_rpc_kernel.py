"""End to end over RabbitMQ: controller file -> notifications -> pull -> kernel -> packets.

The agent manages the node namespace through `[agent] netns` from the root
namespace, where it reaches the broker on 127.0.0.1; VMs hang off the node's
bridge. Every test ends by checking the root namespace's firewall is
untouched (the `stack` fixture).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from agent.controller.diff import Notifications
from agent.controller.notifier import AgentNotifier
from agent.model import parse_port
from agent.vocab.names import Names
from tests.rpc.broker import Broker
from tests.rpc.stack import Stack, notifier_transport, port, tcp_rule, wait_for
from tests.support.topology import serve, tcp_connect

pytestmark = pytest.mark.kernel

FAIL = 0.4   # seconds a probe that must fail may take


def rule_in_kernel(stack: Stack, port_number: int) -> bool:
    return f"--dport {port_number} " in stack.agent.save()


def test_rule_added_in_the_controller_file_is_enforced(stack: Stack) -> None:
    serve(stack.server, tcp=[8080])
    assert not tcp_connect(stack.client, stack.server.ipv4, 8080, timeout=FAIL)
    policy = stack.policy()
    policy["security_groups"]["sg-server"].append(tcp_rule(8080))
    stack.controller.write_policy(policy)
    # How fast is measured below (median < 1 s); here only that it happens.
    wait_for(lambda: tcp_connect(stack.client, stack.server.ipv4, 8080, timeout=0.2),
             10, "the new rule to admit traffic", stack.logs)
    assert stack.agent.source()["error"] is None


def test_member_added_to_a_remote_group_admits_its_traffic(stack: Stack) -> None:
    serve(stack.server, tcp=[5432])
    policy = stack.policy()
    policy["security_groups"]["sg-server"].append(tcp_rule(5432, remote_group_id="sg-db"))
    stack.controller.write_policy(policy)
    wait_for(lambda: rule_in_kernel(stack, 5432), 10, "the remote-group rule", stack.logs)
    assert not tcp_connect(stack.client, stack.server.ipv4, 5432, timeout=FAIL)
    # A member from outside the ports (sg_member_ips): only member_updated is cast.
    policy["sg_member_ips"] = {"sg-db": {"IPv4": [[stack.client.ipv4, None]]}}
    stack.controller.write_policy(policy)
    wait_for(lambda: tcp_connect(stack.client, stack.server.ipv4, 5432, timeout=0.2),
             10, "the new member to get through", stack.logs)
    assert not tcp_connect(stack.other, stack.server.ipv4, 5432, timeout=FAIL)


def test_deleted_port_loses_its_chains(stack: Stack) -> None:
    names = Names()
    chains = [names.port_chain(letter, stack.server.tap) for letter in "io"]
    assert all(f":{c} " in stack.agent.save() for c in chains)
    policy = stack.policy()
    policy["ports"] = [p for p in policy["ports"] if p["id"] != stack.server.port_id]
    stack.controller.write_policy(policy)
    wait_for(lambda: not any(f":{c} " in stack.agent.save() for c in chains), 10,
             "the deleted port's chains to go", stack.logs)
    status = stack.agent.request({"command": "status"})
    assert stack.server.tap in status["unknown_devices"]   # its tap now fails closed
    assert status["ports_active"] == 2


def test_broker_outage_keeps_rules_and_converges_after(
        stack: Stack, broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    serve(stack.server, tcp=[8080])
    before = stack.agent.save()
    policy = stack.policy()
    policy["security_groups"]["sg-server"].append(tcp_rule(8080))
    try:
        broker.stop_app()
        wait_for(lambda: not stack.agent.source()["connected"], 10,
                 "the agent to notice the outage", stack.logs)
        stack.controller.write_policy(policy)   # its notification cannot be delivered
        time.sleep(2)
        status = stack.agent.request({"command": "status"})
        assert status["source"]["error"], status["source"]
        assert stack.agent.save() == before      # the rules in force stay as they are
        assert not tcp_connect(stack.client, stack.server.ipv4, 8080, timeout=FAIL)
    finally:
        broker.ensure_app_running()
    back = time.monotonic()
    wait_for(lambda: tcp_connect(stack.client, stack.server.ipv4, 8080, timeout=0.2),
             60, "the agent to converge after the broker came back", stack.logs)
    converged = time.monotonic() - back
    wait_for(lambda: stack.agent.source()["connected"], 30, "connected again", stack.logs)
    with capsys.disabled():
        print(f"\nbroker back -> change made during the outage enforced: {converged:.1f} s")


def test_controller_restart_changes_nothing(stack: Stack) -> None:
    before = (stack.agent.save(4), stack.agent.save(6))
    stack.controller.stop()
    stack.controller.start()
    stack.controller.wait_serving()
    restarted = time.time()
    stack.agent.resync()   # pull from the new controller and reconcile the kernel
    assert (stack.agent.source()["last_pull_ok_at"] or 0) > restarted, stack.logs()
    assert (stack.agent.save(4), stack.agent.save(6)) == before
    status = stack.agent.request({"command": "status"})
    assert status["in_sync"] and status["ports_active"] == 3, status


def test_flood_of_notifications_costs_a_handful_of_applies(
        stack: Stack, broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 casts (a quarter of them about nothing local) and one real change among them."""
    serve(stack.server, tcp=[8080])
    policy = stack.policy()
    policy["security_groups"]["sg-server"].append(tcp_rule(8080))
    burst = Notifications(rules_updated=("sg-server",), members_updated=("sg-client",),
                          ports_updated=(parse_port(port(stack.server, "sg-server"), False),),
                          ports_deleted=("not-a-local-port",))
    before = stack.agent.request({"command": "status"})
    transport = notifier_transport(broker.url)
    try:
        notifier = AgentNotifier(transport)
        started = time.monotonic()
        for i in range(1000 // burst.count()):
            notifier.send(burst)
            if i == 125:
                stack.controller.write_policy(policy)
        sent = time.monotonic() - started
    finally:
        transport.cleanup()
    wait_for(lambda: tcp_connect(stack.client, stack.server.ipv4, 8080, timeout=0.2),
             10, "the change made during the flood", stack.logs)
    after = wait_for(lambda: _quiet(stack), 20, "the agent to go quiet", stack.logs)
    seen = after["source"]["notifications"] - before["source"]["notifications"]
    pulls = after["source"]["pulls"] - before["source"]["pulls"]
    deliveries = after["source"]["deliveries"] - before["source"]["deliveries"]
    applies = after["applies"] - before["applies"]
    with capsys.disabled():
        print(f"\nflood: {seen} notifications sent in {sent:.2f} s -> {pulls} pulls, "
              f"{deliveries} policies delivered, {applies} applies (drift re-reads included)")
    assert seen >= 1000
    assert deliveries <= 3 and applies <= 8, after


def _quiet(stack: Stack) -> dict[str, Any] | None:
    """The status, once no pull happened for a second."""
    first = stack.agent.request({"command": "status"})
    time.sleep(1.0)
    second = stack.agent.request({"command": "status"})
    return second if first["source"]["pulls"] == second["source"]["pulls"] else None


def test_controller_change_to_enforced_latency(stack: Stack,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not timed: 20 changes, each from file write to rule in the kernel."""
    samples = []
    policy = stack.policy()
    for i in range(20):
        port_number = 10000 + i
        policy["security_groups"]["sg-server"] = [*stack.base["security_groups"]["sg-server"],
                                                  tcp_rule(port_number)]
        started = time.monotonic()
        stack.controller.write_policy(policy)
        wait_for(lambda n=port_number: rule_in_kernel(stack, n), 10, "the rule", stack.logs,
                 interval=0.005)
        samples.append(time.monotonic() - started)
        time.sleep(0.2)
    serve(stack.server, tcp=[10019])
    assert tcp_connect(stack.client, stack.server.ipv4, 10019)
    samples.sort()
    with capsys.disabled():
        print(f"\ncontroller change -> rule in kernel over {len(samples)} changes: "
              f"median {statistics.median(samples) * 1000:.0f} ms, "
              f"min {samples[0] * 1000:.0f} ms, p90 {samples[17] * 1000:.0f} ms, "
              f"max {samples[-1] * 1000:.0f} ms; all: {[round(s * 1000) for s in samples]}")
    assert statistics.median(samples) < 1.0

"""Tampering: whatever someone breaks in the agent's tables is put back, visibly.

One agent (resync_interval 5 s, so its drift checks come at most 5 s apart)
enforces a small policy with real VMs. Each case breaks one thing with the
ordinary tools, checks the break is real, then waits for the kernel to equal
what it was before, table for table and member for member, and checks:

- the repair is counted: a "repaired drift" log line, the
  `hostfw_drift_repairs_total` metric, and the status document's
  `drift_repairs`;
- packets agree again: the client reaches the server, the outsider does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.reliability.support import (
    NAMES,
    backend_params,
    drift_repairs_logged,
    ipset_members,
    metric,
    metrics_conf,
    read_kernel,
    tool,
    vm_port,
    wait_for,
)
from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.fixtures import require_kernel
from tests.support.topology import VM, Topology, serve, udp_probe

pytestmark = pytest.mark.kernel

PORT = 7001
REPAIR_TIMEOUT = 15.0  # the drift check interval is capped at resync_interval (5 s)


@dataclass
class Sandbox:
    topo: Topology
    agent: AgentProcess
    backend: str
    server: VM
    client: VM
    outsider: VM

    def run(self, *argv: str, stdin: str | None = None) -> None:
        self.topo.node.run(list(argv), input=stdin)

    def kernel(self) -> tuple[Any, Any]:
        tables = read_kernel(self.topo.node.ns, self.backend)
        return ({f: {t: k.chains for t, k in by.items()} for f, by in tables.items()},
                ipset_members(self.topo.node.ns))


def policy(server: VM, client: VM, outsider: VM) -> dict[str, Any]:
    return {
        "security_groups": {
            "sg-server": [
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
                 "port_range_min": PORT, "port_range_max": PORT, "remote_group_id": "sg-client"},
                {"direction": "egress", "ethertype": "IPv4"},
            ],
            "sg-client": [{"direction": "egress", "ethertype": "IPv4"}],
            "sg-outsider": [{"direction": "egress", "ethertype": "IPv4"}],
        },
        "ports": [vm_port(server, "sg-server"), vm_port(client, "sg-client"),
                  vm_port(outsider, "sg-outsider")],
    }


@pytest.fixture(scope="module", params=backend_params("iptables-legacy", "iptc"))
def sandbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sandbox]:
    require_kernel()
    backend = request.param
    with Topology() as topo:
        server, client = topo.add_vm("server"), topo.add_vm("client")
        outsider = topo.add_vm("outsider")
        agent = AgentProcess(tmp_path_factory.mktemp(f"tamper-{backend}"), topo.node.ns,
                             policy(server, client, outsider), backend=backend,
                             resync_interval=5, extra_conf=metrics_conf())
        serve(server, udp=[PORT])
        try:
            agent.start()
            yield Sandbox(topo, agent, backend, server, client, outsider)
        finally:
            agent.stop()
            assert_root_clean()


# ---------------------------------------------------------------- the breaks

def flush_port_chain(s: Sandbox) -> None:
    s.run(tool(s.backend), "-w", "-F", NAMES.port_chain("i", s.server.tap))


def delete_group_rule(s: Sandbox) -> None:
    """The server group's allow rule: the client is cut off until the repair."""
    s.run(tool(s.backend), "-w", "-D", NAMES.group_chain("ingress", 4, "sg-server"), "1")


def delete_forward_hook(s: Sandbox) -> None:
    s.run(tool(s.backend), "-w", "-D", "FORWARD", "-j", NAMES.chain("FORWARD"))


def delete_port_chain(s: Sandbox) -> None:
    """Unhook the server's ingress chain from the dispatch tree and delete it."""
    chain = NAMES.port_chain("i", s.server.tap)
    tables, _ = s.kernel()
    filt = tables[4]["filter"]
    refs = [(name, spec) for name, rules in filt.items() for spec in rules
            if spec.endswith(f"-g {chain}") or spec.endswith(f"-j {chain}")]
    assert refs, f"nothing jumps to {chain}"
    script = ["*filter", *[f"-D {name} {spec}" for name, spec in refs], f"-F {chain}",
              f"-X {chain}", "COMMIT", ""]
    s.run(tool(s.backend) + "-restore", "--noflush", "--wait", "5", stdin="\n".join(script))


def delete_ipset_member(s: Sandbox) -> None:
    """The client's address leaves the remote group's set: it is cut off until the repair."""
    s.run("ipset", "del", NAMES.ipset(4, "g", "sg-client"), s.client.ipv4)


BREAKS: dict[str, Callable[[Sandbox], None]] = {
    "flush-port-chain": flush_port_chain,
    "delete-rule": delete_group_rule,
    "delete-hook": delete_forward_hook,
    "delete-chain": delete_port_chain,
    "delete-ipset-member": delete_ipset_member,
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_tampering_is_repaired_and_counted(sandbox: Sandbox, name: str) -> None:
    s = sandbox
    agent = s.agent
    wait_for(lambda: agent.request({"command": "status"}).get("in_sync"), 10, "in sync")
    before = s.kernel()
    logged = drift_repairs_logged(agent)
    counted = metric(agent, "hostfw_drift_repairs_total")
    assert counted is not None, "the agent serves no hostfw_drift_repairs_total"
    in_status = agent.request({"command": "status"})["drift_repairs"]

    BREAKS[name](s)
    assert s.kernel() != before, f"{name} changed nothing"
    wait_for(lambda: s.kernel() == before, REPAIR_TIMEOUT, f"repair of {name}", interval=0.2)

    wait_for(lambda: drift_repairs_logged(agent) > logged, 5, "a 'repaired drift' log line")
    wait_for(lambda: (metric(agent, "hostfw_drift_repairs_total") or 0) > counted, 5,
             "hostfw_drift_repairs_total to grow")
    status = agent.request({"command": "status"})
    assert status["drift_repairs"] > in_status, f"status drift counter did not grow: {status}"
    assert status["last_drift_repair_at"] is not None, status
    assert status["in_sync"] is True, status
    assert udp_probe(s.client, s.server.ipv4, PORT), "client cut off after the repair"
    assert not udp_probe(s.outsider, s.server.ipv4, PORT, timeout=0.3), \
        "outsider let through after the repair"

"""`make demo`: the agent on the example policy in a sandbox, checked with real packets.

Builds a node namespace with a bridge and one VM namespace per port of
etc/hostfw/policy.example.yaml (plus a stranger on an unknown tap), runs the
real hostfw-agent in standalone mode against the node, prints a table of
probes (who -> whom, protocol/port, expected, seen) and `agent-ctl status`,
then `agent-ctl trace` of one allowed and one blocked probe and a few lines of
`/metrics` (served on loopback), then removes everything. Exit status 1 if any
probe disagrees or a trace's verdict differs from what the packets saw.
"""

from __future__ import annotations

import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from tests.support.agent import AgentProcess, assert_root_clean
from tests.support.topology import (
    VM,
    Topology,
    kernel_skip_reason,
    ping,
    send_spoofed,
    serve,
    tcp_connect,
)

POLICY = Path(__file__).resolve().parents[1] / "etc/hostfw/policy.example.yaml"
METRICS_PORT_RE = re.compile(r"metrics, /healthz and /readyz on \S+ \(port (\d+)\)")
# Families of /metrics worth a look on a demo node.
METRICS_SHOWN = ("hostfw_ready", "hostfw_in_sync", "hostfw_generation", "hostfw_ports_active",
                 "hostfw_rules", "hostfw_chains", "hostfw_ipsets", "hostfw_ipset_members",
                 "hostfw_kernel_writes_total", "hostfw_drift_repairs_total",
                 "hostfw_apply_duration_seconds_count", "hostfw_apply_duration_seconds_sum",
                 "hostfw_events_total")


def probes(vms: dict[str, VM]) -> list[tuple[str, str, str, str, bool, object]]:
    """(from, to, what, why, expected, probe) rows, following the example's comments."""
    web1, web2, db1, stranger = vms["web1"], vms["web2"], vms["db1"], vms["stranger"]
    quick = 0.5
    return [
        ("web2", "web1", "tcp/80", "anyone may reach 80", True,
         lambda: tcp_connect(web2, web1.ipv4, 80)),
        ("db1", "web1", "tcp/80", "anyone may reach 80", True,
         lambda: tcp_connect(db1, web1.ipv4, 80)),
        ("db1", "web1", "tcp/81", "no rule for 81", False,
         lambda: tcp_connect(db1, web1.ipv4, 81, timeout=quick)),
        ("web2", "web1", "icmp", "remote group sg-web", True,
         lambda: ping(web2, web1.ipv4)),
        ("db1", "web1", "icmp", "db1 is not in sg-web", False,
         lambda: ping(db1, web1.ipv4, timeout=quick)),
        ("web1", "db1", "tcp/5432", "remote group sg-web", True,
         lambda: tcp_connect(web1, db1.ipv4, 5432)),
        ("web1", "db1", "tcp/22", "admin host 10.0.0.11", True,
         lambda: tcp_connect(web1, db1.ipv4, 22)),
        ("web2", "db1", "tcp/22", "not the admin host", False,
         lambda: tcp_connect(web2, db1.ipv4, 22, timeout=quick)),
        ("db1 as 10.0.0.99", "web1", "udp/5353", "allowed address pair", True,
         lambda: send_spoofed(db1, "10.0.0.99", web1, 5353)),
        ("db1 as 10.0.0.200", "web1", "udp/5353", "spoofed source", False,
         lambda: send_spoofed(db1, "10.0.0.200", web1, 5353, timeout=quick)),
        ("stranger", "web1", "tcp/80", "unknown tap is dropped", False,
         lambda: tcp_connect(stranger, web1.ipv4, 80, timeout=quick)),
        ("web1", "stranger", "tcp/80", "unknown tap is dropped", False,
         lambda: tcp_connect(web1, stranger.ipv4, 80, timeout=quick)),
    ]


def main() -> int:
    reason = kernel_skip_reason()
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 1
    policy = yaml.safe_load(POLICY.read_text())
    failures = 0
    with Topology() as topo, tempfile.TemporaryDirectory(prefix="hfwt-demo-") as tmp:
        vms = {}
        for port in policy["ports"]:
            name = port["device"].removeprefix("tap")
            vms[name] = topo.add_vm(name, port_id=port["id"], tap=port["device"],
                                    mac=port["mac_address"], ipv4=port["fixed_ips"][0],
                                    ipv6=None)
        vms["stranger"] = topo.add_vm("stranger", tap="tapstranger", ipv4="10.0.0.50",
                                      ipv6=None)
        for vm in vms.values():
            serve(vm, tcp=[22, 80, 81, 5432], udp=[5353])
        agent = AgentProcess(Path(tmp), topo.node.ns, policy,
                             extra_conf="[metrics]\nlisten = 127.0.0.1:0\n")
        try:
            agent.start()
            print(f"hostfw-agent runs in standalone mode on {POLICY.name}, managing "
                  f"namespace {topo.node.ns}\n")
            rows = []
            for src, dst, what, why, expected, probe in probes(vms):
                seen = bool(probe())
                failures += seen != expected
                rows.append((src, dst, what, why, "allow" if expected else "block",
                             "allow" if seen else "block", "ok" if seen == expected else "WRONG"))
            header = ("FROM", "TO", "WHAT", "WHY", "EXPECTED", "SEEN", "")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            print("\n$ agent-ctl status")
            print(agent.ctl("status").stdout)
            failures += show_traces(agent, vms)
            show_metrics(agent)
        finally:
            agent.stop()
        assert_root_clean()
    print("sandbox removed." if not failures else f"{failures} probe(s) disagreed.")
    return 1 if failures else 0


def show_traces(agent: AgentProcess, vms: dict[str, VM]) -> int:
    """Trace one allowed and one blocked packet; count verdicts that disagree."""
    web1, web2, db1 = vms["web1"], vms["web2"], vms["db1"]
    wrong = 0
    for args, expected in (
            (["tapweb1", "--proto", "tcp", "--src", web2.ipv4, "--dst", web1.ipv4,
              "--dport", "80"], "ACCEPT"),
            (["tapweb1", "--proto", "icmp", "--src", db1.ipv4, "--dst", web1.ipv4], "DROP")):
        print(f"$ agent-ctl trace {' '.join(args)}")
        out = agent.ctl("trace", *args).stdout
        print(out)
        wrong += expected not in out.splitlines()[-1]
    return wrong


def show_metrics(agent: AgentProcess) -> None:
    match = METRICS_PORT_RE.search(agent.log())
    if not match:
        print("(metrics are off)")
        return
    url = f"http://127.0.0.1:{match.group(1)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    print(f"$ curl -s {url} | grep -E '^({'|'.join(METRICS_SHOWN)})'")
    print("\n".join(line for line in lines if line.split("{")[0].split(" ")[0]
                    in METRICS_SHOWN))


if __name__ == "__main__":
    sys.exit(main())

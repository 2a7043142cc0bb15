"""Configuration options of hostfw (oslo.config).

Rules of this room: every option the agent, `agent-ctl` or `hostfw-controller`
reads is declared here, once, with the names of CONTRACT section 3. Nothing
here reads the options; `register_opts` attaches them to a `ConfigOpts` and
`list_opts` feeds `oslo-config-generator`. The global `cfg.CONF` is used by the
daemon because oslo.messaging expects it.
"""

from __future__ import annotations

import re
import socket

from oslo_config import cfg

CHAIN_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,11}$")
IPSET_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,7}$")
DEVICE_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,7}$")

DEFAULT_OPTS = [
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="This node's name: the RPC server name and the port binding host."),
    cfg.StrOpt("state_path", default="/var/lib/hostfw",
               help="Directory where the agent keeps its state."),
]

AGENT_OPTS = [
    cfg.StrOpt("mode", default="rpc", choices=["rpc", "standalone"],
               help="Where ports and security groups come from: 'rpc' (a controller over "
                    "oslo.messaging) or 'standalone' (the policy file)."),
    cfg.StrOpt("policy_file", default="/etc/hostfw/policy.yaml",
               help="Standalone mode's policy, YAML or JSON (ports, security_groups, "
                    "sg_member_ips, address_groups)."),
    cfg.StrOpt("device_prefix", default="tap",
               help="Netdevs whose name starts with this are VM ports."),
    cfg.IntOpt("resync_interval", default=30, min=1,
               help="Seconds between full resyncs: re-pull the policy, re-read the kernel, "
                    "repair drift."),
    cfg.StrOpt("netns", default="",
               help="Manage this named network namespace (netlink, iptables, ipset) while "
                    "RPC and the admin socket stay in the agent's own. Empty: the agent's "
                    "own namespace."),
    cfg.StrOpt("unknown_device_policy", default="drop", choices=["drop", "accept"],
               help="What a device_prefix netdev with no known port gets."),
    cfg.FloatOpt("batch_window", default=0.05, min=0.0,
                 help="Seconds to wait for more events before applying, so that bursts "
                      "coalesce into one apply."),
]

FIREWALL_OPTS = [
    cfg.StrOpt("backend", default="auto",
               choices=["auto", "iptc", "iptables-legacy", "iptables-nft"],
               help="How rules reach the kernel. 'auto' detects the host's iptables mode."),
    cfg.StrOpt("chain_prefix", default="hostfw",
               help="Every chain the agent owns starts with '<chain_prefix>-'."),
    cfg.StrOpt("ipset_prefix", default="hfw",
               help="Every ipset the agent owns starts with this."),
    cfg.StrOpt("accept_mark", default="0x1000000",
               help="The packet mark bit (one bit, hex) a security group's allow sets on its "
                    "way back to the port chain. Pick a bit no other software on the node "
                    "uses."),
    cfg.BoolOpt("enable_ipv6", default=True,
                help="Program ip6tables too. Turn off only on hosts without IPv6."),
]

ADMIN_OPTS = [
    cfg.StrOpt("socket_path", default="/run/hostfw/agent.sock",
               help="The admin socket agent-ctl talks to (created with mode 0600)."),
]

CONTROLLER_OPTS = [
    cfg.StrOpt("policy_file", default="/etc/hostfw/policy.yaml",
               help="hostfw-controller's source of truth (same format as the standalone "
                    "policy file)."),
]

METRICS_OPTS = [
    cfg.StrOpt("listen", default="",
               help="HOST:PORT for Prometheus /metrics, /healthz and /readyz. Empty: off."),
]

GROUPS: dict[str | None, list[cfg.Opt]] = {
    None: DEFAULT_OPTS,
    "agent": AGENT_OPTS,
    "firewall": FIREWALL_OPTS,
    "admin": ADMIN_OPTS,
    "controller": CONTROLLER_OPTS,
    "metrics": METRICS_OPTS,
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Attach every hostfw option to `conf` (idempotent)."""
    for group, opts in GROUPS.items():
        for opt in opts:
            try:
                conf.register_opt(opt, group=group)
            except cfg.DuplicateOptError:
                pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Entry point for oslo-config-generator (`oslo.config.opts`)."""
    return [("DEFAULT" if g is None else g, list(opts)) for g, opts in GROUPS.items()]


def validate(conf: cfg.ConfigOpts) -> list[str]:
    """Check the values whose shape oslo.config cannot express; return the problems."""
    problems = []
    if not CHAIN_PREFIX_RE.match(conf.firewall.chain_prefix):
        problems.append(f"[firewall] chain_prefix {conf.firewall.chain_prefix!r} must match "
                        f"{CHAIN_PREFIX_RE.pattern}")
    if not IPSET_PREFIX_RE.match(conf.firewall.ipset_prefix):
        problems.append(f"[firewall] ipset_prefix {conf.firewall.ipset_prefix!r} must match "
                        f"{IPSET_PREFIX_RE.pattern}")
    if not DEVICE_PREFIX_RE.match(conf.agent.device_prefix):
        problems.append(f"[agent] device_prefix {conf.agent.device_prefix!r} must match "
                        f"{DEVICE_PREFIX_RE.pattern}")
    try:
        mark = int(conf.firewall.accept_mark, 0)
        if mark <= 0 or mark >= 1 << 32 or mark & (mark - 1):
            raise ValueError
    except ValueError:
        problems.append(f"[firewall] accept_mark {conf.firewall.accept_mark!r} must be a "
                        f"single bit such as 0x1000000")
    if "/" in conf.agent.netns or conf.agent.netns in (".", ".."):
        problems.append(f"[agent] netns {conf.agent.netns!r} is not a namespace name")
    return problems

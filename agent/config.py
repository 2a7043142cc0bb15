"""Configuration options of hostfw (oslo.config).

Rules of this room: every option the agent, `agent-ctl` or `hostfw-controller`
reads is declared here, once, with the names of CONTRACT section 3. Nothing
here reads the options; `register_opts` attaches them to a `ConfigOpts` and
`list_opts` feeds `oslo-config-generator`. The global `cfg.CONF` is used by the
daemon because oslo.messaging expects it.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from oslo_config import cfg

CHAIN_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,11}$")
IPSET_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,7}$")
DEVICE_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,7}$")
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")

LOG_FORMAT = ("%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s [%(threadName)s] "
              "%(instance)s%(message)s")

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
    cfg.FloatOpt("batch_window", default=0.02, min=0.0,
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
    cfg.BoolOpt("conntrack_zones", default=True,
                help="Give the VM traffic of each bridge its own conntrack zone (raw table "
                     "CT --zone), so overlapping tenant addresses stay apart and a port's "
                     "entries can be deleted precisely."),
    cfg.BoolOpt("enable_ipv6", default=True,
                help="Program ip6tables too. Turn off only on hosts without IPv6."),
    cfg.BoolOpt("manage_bridge_nf_call", default=False,
                help="Set net.bridge.bridge-nf-call-iptables (and -ip6tables with IPv6) to "
                     "1 in the managed namespace when they are 0. Without them bridged VM "
                     "traffic bypasses every rule, and the agent reports itself not ready "
                     "with an error until they are 1. Off: they are the node's "
                     "configuration and the agent only reports them. Under the systemd "
                     "unit /proc/sys is read-only (ProtectKernelTunables): turning this "
                     "on needs a drop-in with ProtectKernelTunables=no."),
]

ADMIN_OPTS = [
    cfg.StrOpt("socket_path", default="/run/hostfw/agent.sock",
               help="The admin socket agent-ctl talks to (created with mode 0600)."),
]

CONTROLLER_OPTS = [
    cfg.StrOpt("policy_file", default="/etc/hostfw/policy.yaml",
               help="hostfw-controller's source of truth (same format as the standalone "
                    "policy file)."),
    cfg.FloatOpt("watch_interval", default=0.2, min=0.01,
                 help="Seconds between checks of policy_file for changes (SIGHUP "
                      "reloads at once)."),
]

RPC_OPTS = [
    cfg.FloatOpt("call_timeout", default=10.0, min=0.1,
                 help="Seconds to wait for each security_group_info_for_devices reply "
                      "before the pull counts as failed and is retried."),
    cfg.IntOpt("chunk_size", default=20, min=1,
               help="Devices per security_group_info_for_devices call (Neutron's "
                    "rpc_resources_processing_step)."),
    cfg.FloatOpt("batch_window", default=0.1, min=0.0,
                 help="Seconds to gather notifications before pulling, so that a burst "
                      "of them costs one pull."),
    cfg.FloatOpt("retry_max_interval", default=10.0, min=0.1,
                 help="Longest wait between pull attempts while the broker or the "
                      "controller is unreachable (exponential backoff with jitter)."),
]

METRICS_OPTS = [
    cfg.StrOpt("listen", default="",
               help="HOST:PORT for Prometheus /metrics, /healthz and /readyz. Empty: off."),
]

NAT_OPTS = [
    cfg.StrOpt("fixed_range", default="",
               help="The VMs' IPv4 network (CIDR), e.g. 10.0.0.0/24. Setting it turns on "
                    "nova-network style NAT on this node: floating IPs of local ports, host "
                    "SNAT, the metadata redirect and the DHCP/DNS accepts. Empty: no NAT "
                    "chains at all, and ports' floating_ips are ignored. IPv4 only. Needs "
                    "[firewall] conntrack_zones = false."),
    cfg.StrOpt("routing_source_ip", default="",
               help="Address the fixed range is SNATed to when leaving the node (the host "
                    "SNAT). Empty: no host SNAT, VMs without a floating IP keep their fixed "
                    "source."),
    cfg.StrOpt("public_interface", default="",
               help="The node's public interface: the host SNAT and a floating IP's SNAT "
                    "apply to traffic leaving through it. Empty: to traffic leaving "
                    "through any interface (after the exemptions)."),
    cfg.ListOpt("dmz_cidr", default=[],
                help="IPv4 networks the VMs reach without SNAT, so they see the fixed "
                     "IPs."),
    cfg.StrOpt("metadata_host", default="127.0.0.1",
               help="IPv4 address of the metadata service. 169.254.169.254:80 from the "
                    "fixed range is DNATed there, or REDIRECTed to metadata_port when this is "
                    "a loopback address (the service must then listen on the bridge address "
                    "or 0.0.0.0)."),
    cfg.PortOpt("metadata_port", default=8775, min=1,
                help="TCP port of the metadata service; INPUT accepts it from the fixed "
                     "range."),
    cfg.ListOpt("dhcp_bridges", default=[],
                help="Bridges on which this node serves DHCP and DNS to the VMs: INPUT "
                     "accepts udp and tcp ports 67 and 53 arriving on them."),
]

GROUPS: dict[str | None, list[cfg.Opt]] = {
    None: DEFAULT_OPTS,
    "agent": AGENT_OPTS,
    "firewall": FIREWALL_OPTS,
    "admin": ADMIN_OPTS,
    "controller": CONTROLLER_OPTS,
    "rpc": RPC_OPTS,
    "metrics": METRICS_OPTS,
    "nat": NAT_OPTS,
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


def set_log_defaults(conf: cfg.ConfigOpts) -> None:
    """Register oslo.log's options on `conf` with hostfw's defaults: log to stderr.

    Under systemd stderr is the journal; oslo.log's own default is stdout. Lines
    name their thread: the writer, netlink, admin and RPC threads interleave.
    Called before the command line is parsed (the options include --debug).
    The default is set on the option itself (as oslo.log's own `set_defaults`
    does; `_options` is what oslo.log's generator entry point lists), so the
    generated sample shows it too.
    """
    from oslo_log import _options, log  # imported here: agent-ctl reads this module too

    cfg.set_defaults(_options.generic_log_opts, use_stderr=True)
    cfg.set_defaults(_options.log_opts, logging_default_format_string=LOG_FORMAT)
    log.register_options(conf)


def set_sample_defaults() -> None:
    """oslo-config-generator hook (`oslo.config.opts.defaults`): library defaults hostfw
    changes, so the sample shows the values the agent really runs with."""
    import oslo_messaging

    from agent.sources.rpc_api import CONTROL_EXCHANGE

    set_log_defaults(cfg.CONF)
    oslo_messaging.set_transport_defaults(control_exchange=CONTROL_EXCHANGE)


def validate(conf: cfg.ConfigOpts) -> list[str]:
    """Check the values whose shape oslo.config cannot express; return the problems."""
    problems = []
    if not CHAIN_PREFIX_RE.fullmatch(conf.firewall.chain_prefix):
        problems.append(f"[firewall] chain_prefix {conf.firewall.chain_prefix!r} must match "
                        f"{CHAIN_PREFIX_RE.pattern}")
    if not IPSET_PREFIX_RE.fullmatch(conf.firewall.ipset_prefix):
        problems.append(f"[firewall] ipset_prefix {conf.firewall.ipset_prefix!r} must match "
                        f"{IPSET_PREFIX_RE.pattern}")
    if not DEVICE_PREFIX_RE.fullmatch(conf.agent.device_prefix):
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
    return problems + _nat_problems(conf)


def _nat_problems(conf: cfg.ConfigOpts) -> list[str]:
    """[nat] values reach iptables text verbatim: only addresses and device names pass."""
    nat = conf.nat
    problems = []
    for name, values, kind in (
            ("fixed_range", [nat.fixed_range] if nat.fixed_range else [], "network"),
            ("dmz_cidr", nat.dmz_cidr, "network"),
            ("routing_source_ip", [nat.routing_source_ip] if nat.routing_source_ip else [],
             "address"),
            ("metadata_host", [nat.metadata_host], "address"),
            ("public_interface", [nat.public_interface] if nat.public_interface else [],
             "device"),
            ("dhcp_bridges", nat.dhcp_bridges, "device")):
        for value in values:
            if not _valid(value, kind):
                problems.append(f"[nat] {name} {value!r} is not {NAT_VALUE_KINDS[kind]}")
    if nat.fixed_range and _valid(nat.fixed_range, "network") and \
            ipaddress.IPv4Network(nat.fixed_range, strict=False).prefixlen == 0:
        problems.append("[nat] fixed_range must not be 0.0.0.0/0")
    if nat.fixed_range and conf.firewall.conntrack_zones:
        # A routed flow enters from the bridge in its zone and from the public
        # side in zone 0: its replies would never match, so NAT would not undo.
        problems.append("[nat] needs [firewall] conntrack_zones = false: NAT tracks flows "
                        "that cross bridges and the public interface in one zone")
    return problems


NAT_VALUE_KINDS = {"network": "an IPv4 network", "address": "an IPv4 address",
                   "device": "a device name"}


def _valid(value: str, kind: str) -> bool:
    if kind == "device":
        return bool(DEVICE_NAME_RE.match(value))
    try:
        if kind == "network":
            ipaddress.IPv4Network(value, strict=False)
        else:
            ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True

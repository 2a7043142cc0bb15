"""Configuration options of hostfw (oslo.config).

Rules of this room: every option the agent, `agent-ctl` or `hostfw-controller`
reads is declared here, once, with the names of CONTRACT section 3. Nothing
here reads the options; `register_opts` attaches them to a `ConfigOpts` and
`list_opts` feeds `oslo-config-generator`. The global `cfg.CONF` is used by the
daemon because oslo.messaging expects it.
"""

from __future__ import annotations

import socket

from oslo_config import cfg, types

# Value shapes, checked by oslo.config when an option is read (`validate` reads
# them all at start). Prefixes leave room in iptables' 28-character chain and
# ipset's 31-character set names; device names are IFNAMSIZ - 1 long at most.
NAME_PREFIX_RE = r"^[A-Za-z][A-Za-z0-9_]*$"
DEVICE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
DEVICE_NAME_MAX = 15
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# a.b.c.d/len, len 1 to 32: 0.0.0.0/0 would NAT (or exempt) the whole world.
IPV4_NETWORK_RE = rf"^({_OCTET}\.){{3}}{_OCTET}/([1-9]|[12][0-9]|3[0-2])$"
SINGLE_BIT_RE = r"^0x0*[1248]0*$"  # with at most 8 hex digits: one bit of the 32-bit mark

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
    cfg.StrOpt("device_prefix", default="tap", regex=NAME_PREFIX_RE, max_length=8,
               help="Netdevs whose name starts with this are VM ports. A letter, then "
                    "letters, digits or '_'; at most 8 characters."),
    cfg.IntOpt("resync_interval", default=30, min=1,
               help="Seconds between full resyncs: re-pull the policy, re-read the kernel, "
                    "repair drift."),
    cfg.StrOpt("netns", default="", regex=r"^(?!\.\.?$)[^/]*$", max_length=255,
               help="Manage this named network namespace (netlink, iptables, ipset) while "
                    "RPC and the admin socket stay in the agent's own. Empty: the agent's "
                    "own namespace. A name under /run/netns: no '/', not '.' or '..'."),
    cfg.StrOpt("unknown_device_policy", default="drop", choices=["drop", "accept"],
               help="What a device_prefix netdev with no known port gets."),
    cfg.FloatOpt("batch_window", default=0.0, min=0.0,
                 help="Seconds the writer waits for more events after the first one of a "
                      "burst. 0 (the default) acts on the first event at once; whatever "
                      "arrives while an apply runs is applied together right after it."),
    cfg.FloatOpt("report_interval", default=30.0, min=0.0,
                 help="RPC mode: seconds between report_state heartbeats to Neutron "
                      "(q-reports-plugin), so that 'openstack network agent list' shows "
                      "this agent alive. Keep it well below Neutron's agent_down_time. "
                      "0: no heartbeats (hostfw-controller hears them but needs none)."),
]

FIREWALL_OPTS = [
    cfg.StrOpt("backend", default="auto",
               choices=["auto", "iptc", "iptables-legacy", "iptables-nft"],
               help="How rules reach the kernel. 'auto' detects the host's iptables mode."),
    cfg.StrOpt("chain_prefix", default="hostfw", regex=NAME_PREFIX_RE, max_length=12,
               help="Every chain the agent owns starts with '<chain_prefix>-'. A letter, "
                    "then letters, digits or '_'; at most 12 characters."),
    cfg.StrOpt("ipset_prefix", default="hfw", regex=NAME_PREFIX_RE, max_length=8,
               help="Every ipset the agent owns is named this, then 4 or 6 (the family), "
                    "then its own part; other sets, even ones starting with this prefix, are "
                    "never touched. A letter, then letters, digits or '_'; at most 8 "
                    "characters."),
    cfg.StrOpt("accept_mark", default="0x1000000", regex=SINGLE_BIT_RE, max_length=10,
               help="The packet mark bit a security group's allow sets on its way back to "
                    "the port chain: one bit of 32, in hex (0x1 to 0x80000000). Pick a bit "
                    "no other software on the node uses."),
    cfg.BoolOpt("conntrack_zones", default=True,
                help="Give the VM traffic of each bridge its own conntrack zone (raw table "
                     "CT --zone), so overlapping tenant addresses stay apart and a port's "
                     "entries can be deleted precisely."),
    cfg.BoolOpt("enable_ipv6", default=True,
                help="Program ip6tables too. Turn off only on hosts without IPv6."),
    cfg.IntOpt("ipset_max_members", default=1 << 20, min=1,
               help="Largest remote or address group the agent puts in an ipset. A bigger "
                    "one is refused on its own: its set stays empty, so its rules match "
                    "nothing (fail closed), the error names it, and other changes still "
                    "land."),
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
                 help="Seconds between stat checks of policy_file for changes, behind "
                      "inotify (which reports a rewrite at once; SIGHUP reloads at once)."),
    cfg.IntOpt("rpc_workers", default=0, min=0,
               help="Processes that answer security_group_info_for_devices, besides the "
                    "one that watches the file and sends notifications (0: that one "
                    "answers too). One process answers on one core; use as many as the "
                    "cores you can spare when hundreds of agents pull at once."),
]

RPC_OPTS = [
    cfg.FloatOpt("call_timeout", default=10.0, min=0.1,
                 help="Seconds to wait for each security_group_info_for_devices reply "
                      "before the pull counts as failed and is retried."),
    cfg.IntOpt("chunk_size", default=20, min=1,
               help="Devices per security_group_info_for_devices call (Neutron's "
                    "rpc_resources_processing_step)."),
    cfg.FloatOpt("batch_window", default=0.0, min=0.0,
                 help="Seconds to wait for more notifications after the first before "
                      "pulling. 0 (the default) pulls at once; notifications that arrive "
                      "during a pull are gathered into the next one."),
    cfg.FloatOpt("retry_max_interval", default=10.0, min=0.1,
                 help="Longest wait between pull attempts while the broker or the "
                      "controller is unreachable (exponential backoff with jitter)."),
]

METRICS_OPTS = [
    cfg.StrOpt("listen", default="", regex=r"^$|^(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]*):[0-9]{1,5}$",
               help="HOST:PORT (or [IPV6]:PORT) for Prometheus /metrics, /healthz and "
                    "/readyz, e.g. 127.0.0.1:9741. An empty HOST is every IPv4 address. "
                    "Empty: off."),
]

NAT_OPTS = [
    cfg.StrOpt("fixed_range", default="", regex=rf"^$|{IPV4_NETWORK_RE}",
               help="The VMs' IPv4 network (CIDR, prefix length 1 to 32), e.g. "
                    "10.0.0.0/24. Setting it turns on nova-network style NAT on this node: "
                    "floating IPs of local ports, host SNAT, the metadata redirect and the "
                    "DHCP/DNS accepts. Empty: no NAT "
                    "chains at all, and ports' floating_ips are ignored. IPv4 only. Works "
                    "with [firewall] conntrack_zones on or off."),
    cfg.IPOpt("routing_source_ip", version=4,
              help="IPv4 address the fixed range is SNATed to when leaving the node (the "
                   "host SNAT). Unset: no host SNAT, VMs without a floating IP keep their "
                   "fixed source."),
    cfg.StrOpt("public_interface", default="", regex=rf"^$|{DEVICE_NAME_RE}",
               max_length=DEVICE_NAME_MAX,
               help="The node's public interface: the host SNAT and a floating IP's SNAT "
                    "apply to traffic leaving through it. Empty: to traffic leaving "
                    "through any interface (after the exemptions)."),
    cfg.ListOpt("dmz_cidr", default=[], item_type=types.String(regex=IPV4_NETWORK_RE),
                help="IPv4 networks (CIDR) the VMs reach without SNAT, so they see the "
                     "fixed IPs."),
    cfg.IPOpt("metadata_host", version=4, default="127.0.0.1",
               help="IPv4 address of the metadata service. 169.254.169.254:80 from the "
                    "fixed range is DNATed there, or REDIRECTed to metadata_port when this is "
                    "a loopback address (the service must then listen on the bridge address "
                    "or 0.0.0.0)."),
    cfg.PortOpt("metadata_port", default=8775, min=1,
                help="TCP port of the metadata service; INPUT accepts it from the fixed "
                     "range."),
    cfg.ListOpt("dhcp_bridges", default=[],
                item_type=types.String(regex=DEVICE_NAME_RE, max_length=DEVICE_NAME_MAX),
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
    """The configuration's problems, one line each; never raises.

    oslo.config checks a value against its option's type only when the value
    is read, so a bad one (`conntrack_zones = maybe`) would otherwise surface
    as a traceback wherever it is first used. Every registered option (hostfw's
    and oslo.log's; oslo.messaging registers its own only when the transport is
    made) is read here once. No check spans two options today: `[nat]` works
    with conntrack zones on or off (agent/compiler/nat.py `raw_zones` keys both
    sides of a NAT flow to its bridge's zone).
    """
    return value_problems(conf)


def value_problems(conf: cfg.ConfigOpts) -> list[str]:
    """A line for every option whose configured value does not fit its type; reading
    each one makes oslo.config check it. hostfw-controller needs only this part."""
    problems = []
    for key in list(conf):
        try:
            value = conf[key]
        except (cfg.Error, ValueError) as exc:
            problems.append(f"[DEFAULT] {key}: {_reason(exc)}")
            continue
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            for name in list(value):
                try:
                    value[name]
                except (cfg.Error, ValueError) as exc:
                    problems.append(f"[{key}] {name}: {_reason(exc)}")
    return problems


def _reason(exc: Exception) -> str:
    """oslo.config's message without its 'Value for option X from LocationInfo(...)'."""
    return str(exc).rpartition(" is not valid: ")[2]

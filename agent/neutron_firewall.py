"""Neutron's side of hostfw: a firewall driver that filters nothing but asks for qbr bridges.

Rules of this room:

1. This module runs inside Neutron's L2 agent (neutron-openvswitch-agent),
   which loads it through the `hostfw` entry point of the
   `neutron.agent.firewall_drivers` group (setup.cfg) when its
   `[securitygroup] firewall_driver = hostfw`. It runs on Neutron's Python,
   which may be older than hostfw's own: no syntax past 3.8 at run time, and
   nothing from the rest of the `agent` package is imported.
2. Neutron is optional. When it is importable the driver is a
   `NoopFirewallDriver`, so the OVS agent skips its own security group work
   (no pulls, no chains: hostfw-agent is the only writer of the firewall).
   Without Neutron the module still imports (hostfw's tests, packaging);
   the class is then only the carrier of its flags.
3. The one thing it says is `OVS_HYBRID_PLUG_REQUIRED = True`. The OVS agent
   reads that attribute off its firewall driver and reports it as
   `ovs_hybrid_plug` in its agent state; ML2's openvswitch mechanism driver
   passes it to Nova in the port's vif_details, and os-vif then plugs each
   VM's tap into a per-port Linux bridge (`qbr<id>`) joined to br-int by a
   `qvb<id>`/`qvo<id>` veth pair. That bridge is where br_netfilter hands the
   VM's packets to iptables (physdev), i.e. where hostfw-agent enforces.
4. ARP anti-spoofing stays with the OVS agent
   (`provides_arp_spoofing_protection = False`, as for Neutron's own
   iptables_hybrid driver): iptables never sees ARP.
"""

from __future__ import annotations

try:   # rule 2: Neutron is optional
    from neutron.agent.firewall import NoopFirewallDriver as _Base
except ImportError:   # hostfw's own tests and tools, where Neutron is absent
    _Base = object


class HostfwFirewallDriver(_Base):  # type: ignore[misc, valid-type]
    """Requires hybrid plugging; leaves all filtering to hostfw-agent.

    Every method of Neutron's driver interface is the no-op one inherited
    from `NoopFirewallDriver`: hostfw-agent pulls and notices everything
    itself, including trusted (`network:*`) ports.
    """

    OVS_HYBRID_PLUG_REQUIRED = True
    provides_arp_spoofing_protection = False

"""The minimal notifications that take agents from one policy to the next.

Rules of this room: compare two parsed policies and name only what changed,
the way Neutron's server does after a database change:

- `security_groups_rule_updated` for groups whose rules changed (added,
  removed or edited groups), and for groups whose rules use an address group
  whose CIDRs changed (Neutron's legacy API has no address-group cast; its
  push-mode shim turns such changes into rule updates the same way);
- `security_groups_member_updated` for groups whose members changed, but only
  those some rule uses as a remote group: nobody filters on the others;
- `port_update` for new and changed ports (and ports whose own rules use a
  changed address group), `port_delete` for removed ones.

Pure: no I/O. An unchanged policy gives no notifications at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.model import Policy, Port
from agent.sources.rpc_messages import referenced_remotes


@dataclass(frozen=True)
class Notifications:
    """What to cast, in this order: rules, members, port updates, port deletes."""

    rules_updated: tuple[str, ...] = ()
    members_updated: tuple[str, ...] = ()
    ports_updated: tuple[Port, ...] = ()
    ports_deleted: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rules_updated or self.members_updated or self.ports_updated
                    or self.ports_deleted)

    def count(self) -> int:
        """How many casts these are (each group list is one cast)."""
        return (bool(self.rules_updated) + bool(self.members_updated)
                + len(self.ports_updated) + len(self.ports_deleted))


def diff(old: Policy, new: Policy) -> Notifications:
    changed_ags = {a for a in set(old.address_groups) | set(new.address_groups)
                   if old.address_groups.get(a) != new.address_groups.get(a)}
    rules = {g for g in set(old.groups) | set(new.groups)
             if old.groups.get(g) != new.groups.get(g)}
    for policy in (old, new):
        rules |= {g for g, group_rules in policy.groups.items()
                  if {r.remote_address_group_id for r in group_rules} & changed_ags}
    used_as_remote = set()
    for policy in (old, new):
        used_as_remote |= referenced_remotes(policy.groups.values(), policy.ports)
    members = {g for g in used_as_remote
               if old.members.get(g, {}) != new.members.get(g, {})}
    old_ports = {p.id: p for p in old.ports}
    new_ports = {p.id: p for p in new.ports}
    return Notifications(
        rules_updated=tuple(sorted(rules)),
        members_updated=tuple(sorted(members)),
        ports_updated=tuple(p for p in new.ports if old_ports.get(p.id) != p
                            or _address_groups(p) & changed_ags),
        ports_deleted=tuple(sorted(set(old_ports) - set(new_ports))),
    )


def _address_groups(port: Port) -> set[str | None]:
    """Address groups the port's own rules use (a change there updates the port)."""
    return {r.remote_address_group_id for r in port.security_group_rules}

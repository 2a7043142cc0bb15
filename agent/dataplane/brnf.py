"""Is the bridge netfilter hook alive in the managed namespace?

Rules of this room: run on the writer thread (it lives in `[agent] netns`);
read `/proc/sys/net/bridge/bridge-nf-call-{iptables,ip6tables}`, which are
per network namespace and resolve to the calling thread's one; write them
only when told to (`[firewall] manage_bridge_nf_call`). Nothing else.

Why: every rule of this agent sees bridged VM traffic only through
br_netfilter. With `bridge-nf-call-iptables` (or `ip6tables` for IPv6) at 0,
or br_netfilter not loaded at all, bridged packets skip iptables entirely:
every port is open, yet the rules are in place and the agent would report
itself in sync and ready. The check makes that visible (not ready, an error,
`hostfw_bridge_nf_call_ok`); it is the node's configuration, so it is changed
only when the operator asks the agent to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ROOT = "/proc/sys/net/bridge"
SYSCTLS = {4: "bridge-nf-call-iptables", 6: "bridge-nf-call-ip6tables"}


@dataclass(frozen=True)
class BridgeNf:
    """The hook's state per IP version, and what is wrong with it (empty: all is well)."""

    values: Mapping[int, int | None]   # ip version -> the sysctl's value, None: absent
    problems: tuple[str, ...] = ()
    changed: tuple[str, ...] = field(default=())  # sysctls this check set to 1

    @property
    def ok(self) -> dict[int, bool]:
        return {version: value == 1 for version, value in self.values.items()}


def read(families: Iterable[int], root: str = ROOT) -> dict[int, int | None]:
    """The sysctl of each IP version in the calling thread's namespace."""
    out: dict[int, int | None] = {}
    for family in families:
        try:
            with open(os.path.join(root, SYSCTLS[family])) as f:
                out[family] = int(f.read().strip())
        except FileNotFoundError:
            out[family] = None
    return out


def check(families: Iterable[int], manage: bool = False, root: str = ROOT) -> BridgeNf:
    """Read the hook's sysctls; with `manage`, set any that is 0 to 1 first.

    An OSError other than a missing sysctl (say /proc/sys is read-only under
    the unit's ProtectKernelTunables) is reported as a problem, not raised.
    """
    families = tuple(families)
    changed: list[str] = []
    problems: list[str] = []
    try:
        values = read(families, root)
    except (OSError, ValueError) as exc:
        return BridgeNf(dict.fromkeys(families), (f"cannot read net.bridge sysctls: {exc}",))
    if manage:
        for family, value in values.items():
            if value != 0:
                continue
            name = SYSCTLS[family]
            try:
                with open(os.path.join(root, name), "w") as f:
                    f.write("1\n")
                changed.append(f"net.bridge.{name}")
            except OSError as exc:
                problems.append(f"cannot set net.bridge.{name} to 1: {exc}")
        if changed:
            values = read(families, root)
    for family, value in values.items():
        name = f"net.bridge.{SYSCTLS[family]}"
        if value is None:
            problems.append(f"{name} does not exist in the managed namespace (br_netfilter "
                            f"is not loaded): bridged IPv{family} traffic bypasses every "
                            f"rule; run `modprobe br_netfilter`")
        elif value != 1:
            problems.append(f"{name} is {value} in the managed namespace: bridged "
                            f"IPv{family} traffic bypasses every rule; set it to 1 (or "
                            f"[firewall] manage_bridge_nf_call = true)")
    return BridgeNf(values, tuple(problems), tuple(changed))

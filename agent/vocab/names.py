"""Chain and ipset names: prefixes, truncation, and hashing.

Rules of this room: every name the agent writes into the kernel is made here,
starts with the configured prefix, and fits the kernel's limits (28 bytes for a
chain, 31 for an ipset). A name that would not fit keeps a readable head and
ends in `~` plus a hash; `~` never occurs in an id or device name (the model's
whitelists exclude it), so a shortened name never equals a literal one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

MAX_CHAIN = 28
MAX_IPSET = 31
# Longest prefixes: the names built from them stay whole (config.py checks the same).
MAX_CHAIN_PREFIX = 12
MAX_IPSET_PREFIX = 8
# Shared chain names a per-port chain (`i`, `o` or `s` + device suffix) could spell.
RESERVED_PORT_NAMES = frozenset({"sg-chain", "sg-fallback", "snat"})


def _fit(name: str, limit: int) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return name[: limit - 7] + "~" + digest


@dataclass(frozen=True)
class Names:
    """The names of one agent's kernel objects, from its configured prefixes."""

    chain_prefix: str = "hostfw"
    ipset_prefix: str = "hfw"
    device_prefix: str = "tap"

    def __post_init__(self) -> None:
        # _fit keeps `<chain_prefix>-` whole only while it leaves room for the
        # digest; the config check enforces the same bounds for operators.
        if not 0 < len(self.chain_prefix) <= MAX_CHAIN_PREFIX:
            raise ValueError(f"chain_prefix {self.chain_prefix!r} must have 1 to "
                             f"{MAX_CHAIN_PREFIX} characters")
        if not 0 < len(self.ipset_prefix) <= MAX_IPSET_PREFIX:
            raise ValueError(f"ipset_prefix {self.ipset_prefix!r} must have 1 to "
                             f"{MAX_IPSET_PREFIX} characters")

    def chain(self, name: str) -> str:
        """A shared chain, e.g. `hostfw-FORWARD`."""
        return _fit(f"{self.chain_prefix}-{name}", MAX_CHAIN)

    def port_chain(self, letter: str, device: str) -> str:
        """A per-port chain: i (to the VM), o (from the VM), s (spoof), as in Neutron."""
        suffix = device[len(self.device_prefix):] if device.startswith(self.device_prefix) \
            else device
        name = f"{self.chain_prefix}-{letter}{suffix}"
        if f"{letter}{suffix}" in RESERVED_PORT_NAMES:
            return _fit(name + "-" * MAX_CHAIN, MAX_CHAIN)  # forces the hashed form
        return _fit(name, MAX_CHAIN)

    def group_chain(self, direction: str, family: int, group_id: str) -> str:
        """The shared chain of one security group's rules for one direction and family."""
        return _fit(f"{self.chain_prefix}-g{direction[0]}{family}-{group_id}", MAX_CHAIN)

    def tree_chain(self, root: str, suffix: str) -> str:
        """A dispatch tree node below `root`, for the names its root's prefix plus
        `suffix` starts (`hostfw-from-ab` holds the devices `tapab...`)."""
        return _fit(f"{self.chain(root)}-{suffix}", MAX_CHAIN)

    def ipset(self, family: int, kind: str, group_id: str) -> str:
        """The member set of a remote security group (kind g) or address group (kind a)."""
        return _fit(f"{self.ipset_prefix}{family}{kind}{group_id}", MAX_IPSET)

    def owns_chain(self, name: str) -> bool:
        return name.startswith(self.chain_prefix + "-")

    def owns_ipset(self, name: str) -> bool:
        """Ours: the prefix, a family digit, then a suffix (CONTRACT section 8).

        A bare prefix would claim other tools' sets (`hfw-allow`, `hfwd_ports`),
        and the agent destroys the sets it owns but does not want.
        """
        head = len(self.ipset_prefix)
        return len(name) > head + 1 and name.startswith(self.ipset_prefix) and \
            name[head] in "46"

    @property
    def device_wildcard(self) -> str:
        """The physdev wildcard matching every managed device."""
        return self.device_prefix + "+"

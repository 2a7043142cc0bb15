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

    def chain(self, name: str) -> str:
        """A shared chain, e.g. `hostfw-FORWARD`."""
        return _fit(f"{self.chain_prefix}-{name}", MAX_CHAIN)

    def port_chain(self, letter: str, device: str) -> str:
        """A per-port chain: i (to the VM), o (from the VM), s (spoof), as in Neutron."""
        suffix = device[len(self.device_prefix):] if device.startswith(self.device_prefix) \
            else device
        return _fit(f"{self.chain_prefix}-{letter}{suffix}", MAX_CHAIN)

    def ipset(self, family: int, kind: str, group_id: str) -> str:
        """The member set of a remote security group (kind g) or address group (kind a)."""
        return _fit(f"{self.ipset_prefix}{family}{kind}{group_id}", MAX_IPSET)

    def owns_chain(self, name: str) -> bool:
        return name.startswith(self.chain_prefix + "-")

    def owns_ipset(self, name: str) -> bool:
        return name.startswith(self.ipset_prefix)

    @property
    def device_wildcard(self) -> str:
        """The physdev wildcard matching every managed device."""
        return self.device_prefix + "+"

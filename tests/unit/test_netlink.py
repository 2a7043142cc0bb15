"""DeviceWatcher's report of managed devices and their bridges (pure part)."""

from __future__ import annotations

from agent.sources.netlink import DeviceWatcher


def managed(links: dict[int, tuple[str, int]]) -> dict[str, str]:
    watcher = DeviceWatcher("", "tap", lambda devices, full: None, lambda reason: None)
    return watcher._managed(links)


def test_a_bridge_name_with_iptables_wildcard_is_not_reported() -> None:
    """`brq-+` is a legal netdev name but an interface wildcard in `-i brq-+`:
    a prefix match let it through, and its zone rule would catch every brq-
    bridge. Only whole valid names are reported; the tap stays managed."""
    links = {1: ("brq-+", 0), 2: ("tapa", 1), 3: ("brq-ok", 0), 4: ("tapb", 3),
             5: ("br x", 0), 6: ("tapc", 5)}
    assert managed(links) == {"tapa": "", "tapb": "brq-ok", "tapc": ""}


def test_devices_without_the_prefix_or_a_master() -> None:
    assert managed({1: ("eth0", 0), 2: ("tap1", 0), 3: ("tap2", 9)}) == {"tap1": "",
                                                                        "tap2": ""}

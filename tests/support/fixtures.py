"""Pytest fixtures over :mod:`tests.support.topology`.

Exposed to every test by ``tests/conftest.py``; kept here so the fixture
logic lives next to the library it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.topology import Topology, kernel_skip_reason


def require_kernel() -> None:
    """Skip the calling test when namespaces/iptables cannot be used here."""
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh node namespace with bridge ``br0``; deleted after the test.

    Add VMs with ``topology.add_vm(...)``. Skips (not fails) without root.
    """
    require_kernel()
    with Topology() as topo:
        yield topo

"""Root conftest: makes ``tests.support`` importable and shares fixtures.

Tests that need the kernel (network namespaces, iptables, ipset) either use
the ``topology`` fixture or carry ``@pytest.mark.kernel``; both are skipped
with a clear reason when not running as root.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, _ROOT)

from tests.support.fixtures import topology  # noqa: E402
from tests.support.topology import kernel_skip_reason  # noqa: E402

__all__ = ["topology"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: needs root and network namespaces (skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    reason = kernel_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)

"""hostfw: a host firewall agent enforcing Neutron-style security groups with iptables.

The version is the installed distribution's, which setuptools-scm derived
from git when it was built (pyproject.toml); `version()` reads it from the
package metadata, so nothing is written into the source tree. An editable
install (`make venv`) keeps the version of the commit it was installed at.
"""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "hostfw-agent"
FALLBACK_VERSION = "0.1.0.dev0"  # pyproject.toml's fallback_version: no git, no metadata


@functools.cache
def version() -> str:
    """The installed hostfw-agent version; FALLBACK_VERSION when running uninstalled."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def version_line(prog: str) -> str:
    """What `PROG --version` prints."""
    return f"{prog} {version()}"

"""Standalone mode: the policy file (YAML or JSON, CONTRACT 4.1).

Rules of this room: the file is read whole and parsed by `agent.model`; the
members of each remote group are derived here from every port in the file
(fixed IPs and allowed address pairs), plus the file's `sg_member_ips`. A file
that cannot be read or parsed at all keeps the last good policy in force and
reports the reason; a file with some bad objects loads the good ones.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import yaml

from agent.model import Policy, Port, parse_policy
from agent.sources.base import Deliver, PolicySource

LOG = logging.getLogger(__name__)


def load_policy_text(text: str, path: str = "<policy>") -> Policy:
    """Parse a policy document and derive remote group members from its ports."""
    try:
        raw: Any = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyFileError(f"{path}: not valid YAML or JSON: {exc}") from exc
    except RecursionError:
        raise PolicyFileError(f"{path}: nested too deeply to be a policy") from None
    if raw is None:
        raw = {}
    try:
        policy = parse_policy(raw, strict=True)
    except RecursionError:
        raise PolicyFileError(f"{path}: nested too deeply to be a policy") from None
    return replace(policy, members=derive_members(policy.ports, policy.members))


def derive_members(ports: Iterable[Port],
                   extra: Mapping[str, Mapping[int, frozenset[str]]]
                   ) -> dict[str, dict[int, frozenset[str]]]:
    """Group -> family -> networks: every port's addresses in each of its groups."""
    acc: dict[str, dict[int, set[str]]] = {}
    for group, by_family in extra.items():
        for family, nets in by_family.items():
            acc.setdefault(group, {}).setdefault(family, set()).update(nets)
    for port in ports:
        nets = [str(ipaddress.ip_network(ip)) for ip in port.fixed_ips]
        nets += [pair.ip_address for pair in port.allowed_address_pairs]
        for group in port.security_groups:
            for net in nets:
                family = ipaddress.ip_network(net).version
                acc.setdefault(group, {}).setdefault(family, set()).add(net)
    return {g: {f: frozenset(n) for f, n in fams.items()} for g, fams in acc.items()}


class PolicyFileError(RuntimeError):
    """The policy file as a whole cannot be used (unreadable or not YAML/JSON)."""


class PolicyFileSource(PolicySource):
    """Reads the policy file on start, on resync and on SIGHUP (via resync)."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._deliver: Deliver | None = None
        self.last_error: str | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self.resync()

    def resync(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                policy = load_policy_text(handle.read(), self.path)
        except (OSError, PolicyFileError) as exc:
            self.last_error = f"policy file {self.path}: {exc}; keeping the last good policy"
            LOG.error("%s", self.last_error)
            return
        self.last_error = None
        for error in policy.errors:
            LOG.warning("policy file %s: %s", self.path, error)
        if self._deliver:
            self._deliver(policy)

    def status(self) -> dict[str, Any]:
        return {"policy_file": self.path, "error": self.last_error}

"""Standalone mode: the policy file (YAML or JSON, CONTRACT 4.1).

Rules of this room:

1. The file is parsed by `agent.model`; the members of each remote group are
   derived here from every port in the file (fixed IPs and allowed address
   pairs), plus the file's `sg_member_ips`. A file that cannot be read or
   parsed at all keeps the last good policy in force and reports the reason;
   a file with some bad objects loads the good ones.
2. Incremental: `PolicyLoader` remembers each port, group, member list and
   address group it parsed, keyed by its raw content, and hands back the very
   same object when the content is unchanged. One changed port in a
   1,000-port file is one port validated again, and the compiler's memos see
   identical objects everywhere else. Only good objects are remembered: a
   bad one is checked again on every read, so its error is always reported.
3. The agent notices a rewrite itself (`agent.sources.filewatch`, shared
   with hostfw-controller: inotify, stat as a net, never a half-written
   file), as well as on SIGHUP (`reload`) and `agent-ctl resync`.
   Every read runs on the watch thread, in order, so an older read can never
   overwrite a newer one.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

import yaml

from agent.model import (
    POLICY_KEYS,
    Invalid,
    Policy,
    Port,
    dedupe_ports,
    parse_address_groups,
    parse_groups,
    parse_member_map,
    parse_port,
)
from agent.sources.base import Deliver, PolicySource
from agent.sources.filewatch import FileWatcher

LOG = logging.getLogger(__name__)
V = TypeVar("V")
# libyaml's loader when PyYAML was built with it: the pure-Python one takes
# seconds on a 1,000-port file.
YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Members = dict[str, dict[int, frozenset[str]]]
WATCH_INTERVAL = 1.0   # seconds between stat polls; inotify reports rewrites at once


class PolicyFileError(RuntimeError):
    """The policy file as a whole cannot be used (unreadable or not YAML/JSON)."""


def read_document(text: str, path: str) -> Any:
    try:
        raw: Any = json.loads(text) if text.lstrip().startswith("{") else \
            yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - a safe loader
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyFileError(f"{path}: not valid YAML or JSON: {exc}") from exc
    except RecursionError:
        raise PolicyFileError(f"{path}: nested too deeply to be a policy") from None
    return {} if raw is None else raw


def load_policy_text(text: str, path: str = "<policy>") -> Policy:
    """Parse a policy document and derive remote group members from its ports."""
    return PolicyLoader().load(text, path)


def _key(raw: Any) -> str | None:
    """The raw content as a hashable key; None when it has no stable JSON form."""
    try:
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return None


class _Memo:
    """Parsed objects by raw content, kept for one read to the next."""

    def __init__(self) -> None:
        self.last: dict[Hashable, Any] = {}
        self.now: dict[Hashable, Any] = {}

    def get(self, key: Hashable | None, parse: Callable[[], tuple[V, bool]]) -> V:
        """The object for `key` from the last read, or `parse()` -> (object, good)."""
        if key is not None and key in self.last:
            value = self.now[key] = self.last[key]
            return value  # type: ignore[no-any-return]
        value, good = parse()
        if good and key is not None:
            self.now[key] = value
        return value

    def turn(self) -> None:
        """End of a read: what it did not use is forgotten."""
        self.last, self.now = self.now, {}


class PolicyLoader:
    """Parses successive versions of a policy document, reusing unchanged objects."""

    def __init__(self) -> None:
        self._ports, self._groups, self._members = _Memo(), _Memo(), _Memo()
        self._addresses, self._derived = _Memo(), _Memo()
        self._last_members: Members = {}

    def load(self, text: str, path: str = "<policy>") -> Policy:
        """Parse a policy document's text (YAML or JSON)."""
        raw = read_document(text, path)
        try:
            return self.parse(raw)
        except RecursionError:
            raise PolicyFileError(f"{path}: nested too deeply to be a policy") from None

    def parse(self, raw: Any) -> Policy:
        """Parse an already decoded document; what this read did not use is forgotten."""
        try:
            return self._parse(raw)
        finally:
            for memo in (self._ports, self._groups, self._members, self._addresses,
                         self._derived):
                memo.turn()

    def _parse(self, raw: Any) -> Policy:
        """As `agent.model.parse_policy(raw, strict=True)`, object by object."""
        errors: list[str] = []
        if not isinstance(raw, Mapping):
            return Policy(errors=(f"policy {repr(raw)[:60]} is not a mapping",))
        unknown = sorted(str(k) for k in raw if k not in POLICY_KEYS)
        if unknown:
            errors.append(f"policy has unknown top-level keys {unknown} (ignored)")
        groups = self._by_entry(raw.get("security_groups") or {}, self._groups, parse_groups,
                                errors)
        ports = dedupe_ports(self._port_list(raw.get("ports") or [], errors), errors)
        members = self._by_entry(raw.get("sg_member_ips"), self._members, parse_member_map,
                                 errors)
        addresses = self._by_entry(raw.get("address_groups"), self._addresses,
                                   parse_address_groups, errors)
        return Policy(ports=tuple(ports), groups=groups,
                      members=self._derive_members(ports, members),
                      address_groups=addresses, errors=tuple(errors))

    def _port_list(self, raw: Any, errors: list[str]) -> list[Port]:
        if not isinstance(raw, list):
            errors.append(f"ports {repr(raw)[:60]} is not a list")
            return []
        ports = []
        for i, item in enumerate(raw):
            def parse(item: Any = item, i: int = i) -> tuple[Port | None, bool]:
                try:
                    return parse_port(item, True, what=f"port #{i}"), True
                except Invalid as exc:
                    errors.append(str(exc))
                    return None, False
            port = self._ports.get(_key(item), parse)
            if port is not None:
                ports.append(port)
        return ports

    @staticmethod
    def _by_entry(raw: Any, memo: _Memo, parse: Callable[[Any, list[str]], dict[str, V]],
                  errors: list[str]) -> dict[str, V]:
        """A mapping section (groups, members, address groups), one entry at a time."""
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            return parse(raw, errors)   # reports the section's own shape error
        out: dict[str, V] = {}
        for key, value in raw.items():
            def one(key: Any = key, value: Any = value) -> tuple[dict[str, V], bool]:
                mine: list[str] = []
                parsed = parse({key: value}, mine)
                errors.extend(mine)
                return parsed, not mine
            out.update(memo.get(_key([key, value]) if isinstance(key, str) else None, one))
        return out

    def _derive_members(self, ports: Iterable[Port],
                        extra: Mapping[str, Mapping[int, frozenset[str]]]) -> Members:
        """`derive_members`, with each port's part remembered; a group whose networks
        are unchanged keeps last read's frozenset object."""
        parts = (self._derived.get(port, lambda p=port: (_port_members(p), True))
                 for port in ports)
        out = _collect(parts, extra, self._last_members)
        self._last_members = out
        return out


def derive_members(ports: Iterable[Port],
                   extra: Mapping[str, Mapping[int, frozenset[str]]]) -> Members:
    """Group -> family -> networks: every port's addresses in each of its groups, plus
    `extra` (the file's sg_member_ips)."""
    return _collect((_port_members(port) for port in ports), extra, {})


def _collect(parts: Iterable[Iterable[tuple[str, int, str]]],
             extra: Mapping[str, Mapping[int, frozenset[str]]], last: Members) -> Members:
    acc: dict[str, dict[int, set[str]]] = {}
    for group, by_family in extra.items():
        for family, nets in by_family.items():
            acc.setdefault(group, {}).setdefault(family, set()).update(nets)
    for part in parts:
        for group, family, net in part:
            acc.setdefault(group, {}).setdefault(family, set()).add(net)
    out: Members = {}
    for group, fams in acc.items():
        old = last.get(group, {})
        out[group] = {f: old[f] if old.get(f) == n else frozenset(n) for f, n in fams.items()}
    return out


def _port_members(port: Port) -> tuple[tuple[str, int, str], ...]:
    """(group, family, network) for each address of `port` in each of its groups."""
    nets = [str(ipaddress.ip_network(ip)) for ip in port.fixed_ips]
    nets += [pair.ip_address for pair in port.allowed_address_pairs]
    fams = [(net, 6 if ":" in net else 4) for net in nets]
    return tuple((group, family, net) for group in port.security_groups
                 for net, family in fams)


class PolicyFileSource(PolicySource):
    """Reads the policy file on start, when it is rewritten, on SIGHUP and on resync."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._deliver: Deliver | None = None
        self._loader = PolicyLoader()
        self._lock = threading.Lock()   # one read at a time, delivered in order
        self._watch = FileWatcher(path, WATCH_INTERVAL, self._reload)
        self.last_error: str | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._reload("start")
        self._watch.start()

    def reload(self) -> None:
        """SIGHUP: read the file again on the watch thread (returns at once)."""
        self._watch.request("SIGHUP")

    def resync(self) -> None:
        """Read the file now (on the caller's thread), in order with every other read."""
        self._reload("resync")

    def stop(self) -> None:
        self._watch.stop()

    def _reload(self, reason: str) -> None:
        with self._lock:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    policy = self._loader.load(handle.read(), self.path)
            except (OSError, PolicyFileError) as exc:
                self.last_error = f"policy file {self.path}: {exc}; keeping the last good policy"
                LOG.error("%s", self.last_error)
                return
            self.last_error = None
            for error in policy.errors:
                LOG.warning("policy file %s: %s", self.path, error)
            LOG.debug("policy file %s read (%s)", self.path, reason)
            if self._deliver:
                self._deliver(policy)

    def status(self) -> dict[str, Any]:
        return {"policy_file": self.path, "error": self.last_error}


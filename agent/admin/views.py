"""Read-only views of the agent for the admin socket: `show`, `dump` and `trace`.

Rules of this room: build plain JSON-able dicts from the agent's state; the
only kernel read (`show`'s "as applied") goes through the writer thread.
`trace` walks the compiled ruleset, not the kernel: `diff` (agent/admin/
diff.py) says whether the two differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.trace import Probe, resolve, trace
from agent.vocab.ruleset import Ruleset


def ruleset_json(ruleset: Ruleset) -> dict[str, Any]:
    tables = {
        f"ipv{family}/{name}": {
            "hooks": [f"-A {h.chain} {h.spec}" for h in table.hooks],
            "chains": {chain: [rule.text for rule in rules]
                       for chain, rules in table.chains.items()},
        }
        for (family, name), table in sorted(ruleset.tables.items())
    }
    ipsets = {name: {"family": f"ipv{s.family}", "type": s.kind, "members": sorted(s.members)}
              for name, s in sorted(ruleset.ipsets.items())}
    return {"tables": tables, "ipsets": ipsets}


def dump(state: Any) -> dict[str, Any]:
    with state.lock:
        compiled = state.compiled
    if compiled is None:
        return {"tables": {}, "ipsets": {}, "generation": state.generation}
    return {**ruleset_json(compiled.ruleset), "generation": state.generation}


def show_port(agent: Any, key: str) -> dict[str, Any]:
    """One port's chains as the kernel holds them, found by port id or device."""
    state = agent.state
    with state.lock:
        policy, compiled = state.policy, state.compiled
    port = next((p for p in (policy.ports if policy else ())
                 if key in (p.id, p.device)), None)
    if port is None:
        return {"ok": False, "error": f"no port with id or device {key!r}"}
    chains = set(compiled.port_chains.get(port.id, ())) if compiled else set()
    kernel = agent.call_on_writer(lambda engine: engine.read())
    applied = {
        f"ipv{family}/{table}": {name: rules for name, rules in kt.chains.items()
                                 if name in chains}
        for family, tables in kernel.items() for table, kt in tables.items()
    }
    return {
        "ok": True,
        "port": {"id": port.id, "device": port.device, "mac_address": port.mac_address,
                 "fixed_ips": list(port.fixed_ips), "security_groups": list(port.security_groups),
                 "port_security_enabled": port.port_security_enabled,
                 "present": port.device in state.devices},
        "chains": {k: v for k, v in applied.items() if v},
    }


TRACE_TEXT = ("port", "proto", "direction", "src", "dst", "ctstate", "peer", "src_mac")
TRACE_NUMBERS = {"sport": 65535, "dport": 65535, "icmp_type": 255, "icmp_code": 255}


def trace_packet(agent: Any, request: dict[str, Any]) -> dict[str, Any]:
    """`trace`: walk one described packet through the compiled ruleset (agent/trace.py)."""
    unknown = sorted(set(request) - {"command", *TRACE_TEXT, *TRACE_NUMBERS})
    if unknown:  # a misspelt field would silently trace another packet
        return {"ok": False, "error": f"trace does not know {', '.join(unknown)}"}
    fields: dict[str, Any] = {}
    for key in TRACE_TEXT:
        value = request.get(key)
        if value is not None and not isinstance(value, str):
            return {"ok": False, "error": f"trace: {key} must be a string"}
        if value:
            fields[key] = value
    for key, top in TRACE_NUMBERS.items():
        value = request.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= top):
            return {"ok": False, "error": f"trace: {key} must be a number from 0 to {top}"}
        if value is not None:
            fields[key] = value
    if "port" not in fields or "proto" not in fields:
        return {"ok": False, "error": "trace needs 'port' (a port id or device) and 'proto'"}
    state = agent.state
    with state.lock:
        policy, compiled, devices, in_sync = (state.policy, state.compiled, state.devices,
                                              state.in_sync)
    if policy is None or compiled is None:
        return {"ok": False, "error": "the agent has no compiled policy yet"}
    resolved = resolve(Probe(**fields), policy, devices, dict(agent.bridges))
    result = trace(compiled.ruleset, resolved.packet, agent.settings.names.device_prefix)
    return {
        "ok": True, "verdict": result.verdict, "reason": result.reason, "in_sync": in_sync,
        "from": resolved.sender.label, "to": resolved.receiver.label,
        "packet": dataclasses.asdict(resolved.packet), "notes": list(resolved.notes),
        "steps": [dataclasses.asdict(step) for step in result.steps],
    }

"""Read-only views of the agent for the admin socket: `show` and `dump`.

Rules of this room: build plain JSON-able dicts from the agent's state; the
only kernel read (`show`'s "as applied") goes through the writer thread.
"""

from __future__ import annotations

from typing import Any

from agent.dataplane.ruleset import Ruleset


def ruleset_json(ruleset: Ruleset) -> dict[str, Any]:
    tables = {
        f"ipv{family}/{name}": {
            "hooks": [f"-A {h.chain} {h.spec}" for h in table.hooks],
            "chains": {chain: list(rules) for chain, rules in table.chains.items()},
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

"""`diff`: what a resync would change in the kernel, without changing it.

Rules of this room:

1. Read only. The kernel is read on the writer thread (the only one inside
   the managed namespace) and compared with the ruleset the agent compiled
   last; nothing is compiled anew and nothing is written, so `diff` shows
   drift exactly as the next resync would find and repair it.
2. No planning logic of its own: the table plans come from `Engine.plans`
   and the ipset changes from `plan_ipsets`, the very functions an apply
   uses. This module only turns them into JSON and the CLI's text.
"""

from __future__ import annotations

import difflib
from typing import Any

from agent.dataplane.engine import Engine, KernelView
from agent.dataplane.ipsets import IpsetPlan, plan_ipsets
from agent.dataplane.plan import TablePlan


def diff(agent: Any) -> dict[str, Any]:
    """The `diff` answer: per table the chains, hooks and ipsets a resync would change."""
    state = agent.state
    with state.lock:
        compiled, generation = state.compiled, state.generation
    if compiled is None:
        return {"ok": False, "error": "the agent has not compiled a ruleset yet"}
    desired = compiled.ruleset

    def read_and_plan(engine: Engine) -> tuple[list[TablePlan], IpsetPlan, KernelView]:
        kernel = engine.read()
        set_plan = plan_ipsets(desired.ipsets, engine.read_sets())
        return engine.plans(desired, kernel), set_plan, kernel

    plans, set_plan, kernel = agent.call_on_writer(read_and_plan)
    tables = [_table_json(plan, kernel) for plan in plans]
    ipsets = _ipsets_json(set_plan)
    return {"ok": True, "in_sync": not tables and not ipsets, "generation": generation,
            "tables": tables, "ipsets": ipsets}


def _table_json(plan: TablePlan, kernel: KernelView) -> dict[str, Any]:
    have = kernel.get(plan.family, {}).get(plan.table)
    chains = have.chains if have else {}
    changes = [{"chain": name, "action": "rewrite" if name in chains else "create",
                "kernel": chains.get(name), "desired": [rule.text for rule in rules]}
               for name, rules in plan.rewrites.items()]
    changes += [{"chain": name, "action": "delete" if name in plan.deletes else "flush",
                 "kernel": chains.get(name, []), "desired": None}
                for name in dict.fromkeys(plan.flushes + plan.deletes)]
    return {
        "table": f"ipv{plan.family}/{plan.table}",
        "chains": changes,
        "hooks_inserted": [f"-A {hook.chain} {hook.spec}" for hook in plan.hook_inserts],
        "hooks_deleted": [f"-A {chain} {spec}" for chain, spec in plan.hook_deletes],
        "script": plan.script(),
    }


def _ipsets_json(plan: IpsetPlan) -> list[dict[str, Any]]:
    """Per set: created, rebuilt (a set of the wrong type or family), members, destroyed.

    `plan_ipsets` rebuilds a set by destroying it and creating it again before
    the tables are written; a destroy in `after` is a set that goes for good.
    """
    sets: dict[str, dict[str, Any]] = {}
    for phase in (plan.before, plan.after):
        for verb, name, *rest in (line.split() for line in phase):
            entry = sets.setdefault(name, {"name": name, "create": False, "rebuild": False,
                                           "destroy": False, "add": [], "del": []})
            if verb == "create":
                entry["rebuild" if phase is plan.before and entry["destroy"] else "create"] = True
                if entry["rebuild"]:
                    entry["destroy"] = False
            elif verb == "add":
                entry["add"].append(rest[0])
            elif verb == "del":
                entry["del"].append(rest[0])
            elif verb == "destroy":
                entry["destroy"] = True
    return list(sets.values())


def render(reply: dict[str, Any]) -> str:
    """The CLI's text: a unified diff from the kernel to what the agent wants."""
    if reply.get("in_sync"):
        return "no changes: the kernel matches the agent's ruleset"
    out: list[str] = []
    for table in reply.get("tables", []):
        name = table["table"]
        for change in table["chains"]:
            chain = change["chain"]
            old = [f"-A {chain} {r}" for r in change["kernel"] or []]
            new = [f"-A {chain} {r}" for r in change["desired"] or []]
            label = {"create": "new chain", "rewrite": "rewrite", "delete": "delete chain",
                     "flush": "flush chain (still referenced, kept)"}[change["action"]]
            out.append(f"=== {name} {chain}: {label}")
            out += list(difflib.unified_diff(old, new, f"kernel {chain}", f"agent {chain}",
                                             lineterm="", n=2))[2:]
        # The script's order: deletes first, so a misordered hook shows as a move.
        for hook in table["hooks_deleted"]:
            out += [f"=== {name} hook: delete", f"-{hook}"]
        for hook in table["hooks_inserted"]:
            out += [f"=== {name} hook: insert at the top", f"+{hook}"]
    for ipset in reply.get("ipsets", []):
        what = ("rebuild" if ipset["rebuild"] else "create" if ipset["create"]
                else "destroy" if ipset["destroy"] else "members")
        out.append(f"=== ipset {ipset['name']}: {what}")
        out += [f"+{m}" for m in ipset["add"]] + [f"-{m}" for m in ipset["del"]]
    return "\n".join(out)

"""One in-process cold apply by whichever `agent` package is on PYTHONPATH (bench/baseline.py).

    python -P bench/baseline_driver.py POLICY.json BACKEND

Rules of this room:

1. Run inside the target namespace (`ip netns exec`), with `-P` so this
   file's directory does not shadow the tree under test: `agent` is the
   working tree's or a baseline revision's, as PYTHONPATH says.
2. Only the API both trees share is used (`agent.compiler`'s
   `compile_ruleset`, `Settings`, `Snapshot`; `agent.dataplane.engine.Engine`;
   `RestoreBackend`; `agent.model.parse_policy`; `derive_members`), and
   nothing of bench/ or tests/, which need not exist in the baseline tree.
3. What is timed is engine_bench.py's cold sample: parse the policy, compile
   the whole snapshot, apply it to an empty kernel. The process is fresh, so
   every render cache starts empty; imports and reading the JSON are not
   timed. One JSON line on stdout is the result.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

BRIDGE = "br0"
ZONE = 4097


def main(argv: list[str]) -> int:
    policy_path, backend = argv[1], argv[2]
    from agent.compiler import Settings, Snapshot, compile_ruleset
    from agent.dataplane.engine import Engine
    from agent.dataplane.restore_backend import RestoreBackend
    from agent.model import parse_policy
    from agent.sources.policy_file import derive_members

    doc = json.loads(Path(policy_path).read_text())
    settings = Settings()
    t0 = time.perf_counter()
    policy = parse_policy(doc, strict=True)
    if policy.errors:
        raise SystemExit(f"the policy does not parse cleanly: {policy.errors[:3]}")
    policy = replace(policy, members=derive_members(policy.ports, policy.members))
    t1 = time.perf_counter()
    devices = frozenset(port.device for port in policy.ports)
    compiled = compile_ruleset(Snapshot(policy, devices, settings,
                                        {d: BRIDGE for d in devices}, {BRIDGE: ZONE}))
    t2 = time.perf_counter()
    engine = Engine(RestoreBackend(backend), settings.names, settings.families)
    report = engine.apply(compiled.ruleset)
    t3 = time.perf_counter()
    print(json.dumps({"parse_s": t1 - t0, "compile_s": t2 - t1, "apply_s": t3 - t2,
                      "total_s": t3 - t0, "in_sync": report.in_sync,
                      "lines_written": report.lines_written,
                      "compiled_rules": compiled.ruleset.rule_count(),
                      "agent_module": sys.modules["agent"].__file__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

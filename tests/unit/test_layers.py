"""The package layers: the shared vocabulary sits below the compiler and the dataplane.

Why: the compiler is pure and the dataplane does the I/O; if either reached
into the other, a change to one would ripple into the other's tests and the
pure core could pick up I/O. `agent/vocab` imports nothing else of the agent,
the compiler never imports the dataplane, and the dataplane never imports
the compiler (issue 13, item 5).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"


def imported_modules(package: str) -> dict[str, set[str]]:
    """file -> the agent modules it imports (absolute imports only; the agent uses no others)."""
    out: dict[str, set[str]] = {}
    for path in sorted((AGENT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        out[str(path.relative_to(AGENT.parent))] = {n for n in names if n.startswith("agent")}
    return out


@pytest.mark.parametrize(("package", "allowed"), [
    ("vocab", ("agent.vocab",)),
    ("compiler", ("agent.vocab", "agent.compiler", "agent.model")),
    ("dataplane", ("agent.vocab", "agent.dataplane")),
])
def test_each_layer_imports_only_what_is_below_it(package: str, allowed: tuple[str, ...]) -> None:
    found = imported_modules(package)
    assert found, package
    wrong = {path: sorted(n for n in names if not n.startswith(allowed))
             for path, names in found.items()}
    assert {path: names for path, names in wrong.items() if names} == {}

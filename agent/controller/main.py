"""hostfw-controller entry point (a placeholder until the RPC issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("hostfw-controller: not yet implemented (see the RPC issue); "
          "run hostfw-agent with [agent] mode = standalone", file=sys.stderr)
    return 1

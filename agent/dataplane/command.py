"""Running kernel tools (iptables-*, ipset) as subprocesses.

Rules of this room: every subprocess the dataplane starts goes through `run`,
which is called on the writer thread only, so the child inherits the thread's
network namespace (see agent/netns.py). A failure raises `KernelWriteError`
carrying the tool's own message.
"""

from __future__ import annotations

import subprocess


class KernelWriteError(RuntimeError):
    """A kernel command failed; the message carries the command's own reason."""


def run(argv: list[str], stdin: str | None = None, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelWriteError(f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise KernelWriteError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[:2000]}")
    return proc.stdout

"""Run a call on a fresh thread that entered a network namespace, as the agent's writer does.

Why a thread: `setns` moves only the calling thread, so the test's own thread
stays in the root namespace (where nothing may be touched) and each call
gets a thread that lives and dies inside the sandbox. Whatever the call
raises is raised again in the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from agent import netns

T = TypeVar("T")


def call_in_netns(ns: str, fn: Callable[[], T], timeout: float = 120.0) -> T:
    """`fn()` on a thread inside `ns`; its exception (or a timeout) is raised here."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            netns.enter(ns)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"a call in netns {ns} took more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]

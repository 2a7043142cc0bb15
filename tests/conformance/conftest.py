"""One sandbox per firewall backend for the whole conformance package.

Why package scope with backend params: pytest then runs every conformance
test against one backend's sandbox before building the next, so the suite
pays for namespaces and an agent start once per backend, not per test or
per module. Each test applies the full policy it needs, so order does not
matter. The `iptc` backend is included once its module exists.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.helpers import Sandbox, build_sandbox
from tests.support.agent import assert_root_clean
from tests.support.topology import kernel_skip_reason

RESTORE_TOOL = {"iptables-legacy": "iptables-legacy-restore",
                "iptables-nft": "iptables-nft-restore"}


def _iptc_missing() -> str | None:
    try:
        found = importlib.util.find_spec("agent.dataplane.iptc_backend") is not None
    except ImportError:
        found = False
    if not found:
        return "iptc backend not implemented yet (agent/dataplane/iptc_backend.py is missing)"
    return None


def _tool_missing(backend: str) -> str | None:
    tool = RESTORE_TOOL.get(backend)
    if tool and shutil.which(tool) is None:
        return f"{tool} is not installed (run make deps)"
    return None


def _param(backend: str) -> object:
    reason = _iptc_missing() if backend == "iptc" else _tool_missing(backend)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(backend, marks=marks, id=backend)


BACKENDS = [_param(b) for b in ("iptables-legacy", "iptables-nft", "iptc")]


@pytest.fixture(scope="package", params=BACKENDS)
def sb(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The running sandbox of one backend (see helpers.py for its shape)."""
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    backend: str = request.param
    workdir: Path = tmp_path_factory.mktemp(f"conformance-{backend}")
    with build_sandbox(backend, workdir) as sandbox:
        yield sandbox
    assert_root_clean()


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before each test: a live agent and empty server logs.

    Why restart a dead agent: one crash would otherwise fail every later test
    of the backend with a misleading error; the crash is still reported by
    the test during which it happened, through this fixture's teardown check.
    """
    if "sb" not in request.fixturenames:
        yield
        return
    sandbox: Sandbox = request.getfixturevalue("sb")
    agent = sandbox.agent
    if agent.proc is None or agent.proc.poll() is not None:
        agent.stop()
        agent.start()
    for server in sandbox.servers.values():
        server.clear()
    yield
    if agent.proc is None or agent.proc.poll() is not None:
        pytest.fail(f"hostfw-agent died during the test:\n{agent.log()}")

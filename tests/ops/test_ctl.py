"""agent-ctl's interface: help for everything, exit codes, one meaning of --timeout.

The agent is stood in for by a unix socket in a thread that records each
request and answers with a canned reply: what is under test is the client's
side of the socket protocol (CONTRACT 6), which a real agent would hide.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import version
from agent.admin import ctl
from tests.support.agent import tool


class FakeAgent:
    """Answers every request on `path` with `reply`; keeps the requests."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.path, self.reply = str(path), reply
        self.requests: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                conn.sendall(json.dumps(self.reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeAgent]:
    agent = FakeAgent(tmp_path / "agent.sock", {"ok": True})
    yield agent
    agent.close()


def run(fake: FakeAgent, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = ctl.main(["--socket", fake.path, *args])
    out, err = capsys.readouterr()
    return code, out, err


STATUS = {"ok": True, "mode": "standalone", "backend": "iptables-legacy", "generation": 3,
          "ports_active": 1, "last_apply_ok_at": None, "errors": []}


def walk(parser: argparse.ArgumentParser, path: str = "agent-ctl") -> Iterator[tuple[str, Any]]:
    """(where, action) for every option, positional and subcommand of the tree."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", helps.get(name)
                yield from walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield f"{path} {'/'.join(action.option_strings) or action.dest}", action.help


def test_every_subcommand_and_option_has_help() -> None:
    items = dict(walk(ctl.build_parser()))
    assert "agent-ctl resync --timeout" in items and "agent-ctl trace --ctstate" in items
    assert {"agent-ctl status", "agent-ctl resync", "agent-ctl trace"} <= set(items)
    missing = sorted(where for where, text in items.items() if not (text or "").strip())
    assert not missing, f"no help text: {missing}"


@pytest.mark.parametrize("in_sync, code", [(True, 0), (False, 1)])
def test_status_exits_1_when_the_agent_is_not_in_sync(
        fake: FakeAgent, capsys: pytest.CaptureFixture[str], in_sync: bool, code: int) -> None:
    fake.reply = {**STATUS, "in_sync": in_sync}
    for args in (["status"], ["status", "--json"]):
        got, out, err = run(fake, *args, capsys=capsys)
        assert got == code, (args, err)
        assert "generation" in out                        # the answer is shown either way
        assert ("not in sync" in err) == (not in_sync)


@pytest.mark.parametrize("args, deadline", [
    (["resync", "--wait"], 60.0),
    (["resync", "--wait", "--timeout", "7"], 7.0),            # CONTRACT 6's spelling
    (["--timeout", "7", "resync", "--wait"], 7.0),            # the global one: same meaning
    (["--timeout", "99", "resync", "--wait", "--timeout", "7"], 7.0),   # the last one wins
])
def test_timeout_means_the_same_before_and_after_resync(
        fake: FakeAgent, capsys: pytest.CaptureFixture[str], args: list[str],
        deadline: float) -> None:
    code, out, _ = run(fake, *args, capsys=capsys)
    assert code == 0 and out.startswith("resync done")
    assert fake.requests == [{"command": "resync", "wait": True, "timeout": deadline}]


def test_resync_without_wait_only_queues(fake: FakeAgent,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(fake, "--timeout", "3", "resync", capsys=capsys)
    assert (code, out) == (0, "resync queued\n")
    assert fake.requests == [{"command": "resync", "wait": False}]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_timeout_must_be_a_positive_number(fake: FakeAgent, value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        ctl.main(["--socket", fake.path, "resync", "--timeout", value])
    assert exit_.value.code == 2 and fake.requests == []


def test_version_is_printed_and_exits_0() -> None:
    proc = subprocess.run([tool("agent-ctl"), "--version"], capture_output=True, text=True,
                          timeout=30)
    assert (proc.returncode, proc.stdout) == (0, f"agent-ctl {version()}\n")

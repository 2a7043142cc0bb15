"""Run the real `hostfw-agent` against a sandbox node, and drive it as an operator.

Why a process and not an in-process object: the tests must exercise what an
operator runs (console script, config file, admin socket, `agent-ctl`), and a
process can be killed with SIGKILL to test crash safety. The agent stays in
the root namespace with `[agent] netns` pointing at the node namespace, so
this also proves that nothing lands in the host's own firewall
(`assert_root_clean`).

This module must not import pytest: the demo uses it too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SAVE_TOOLS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
              "ip6tables-nft-save")


def tool(name: str) -> str:
    """A console script of this checkout (the venv's, else the PATH's)."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


class AgentProcess:
    """One `hostfw-agent` in standalone mode managing namespace `netns`."""

    def __init__(self, workdir: Path, netns: str, policy: dict[str, Any], *,
                 backend: str = "iptables-legacy", resync_interval: int = 30,
                 extra_conf: str = "") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.socket = str(self.workdir / "agent.sock")
        self.policy_path = self.workdir / "policy.yaml"
        self.conf_path = self.workdir / "agent.conf"
        self.log_path = self.workdir / "agent.log"
        self.write_policy(policy)
        self.conf_path.write_text(
            "[DEFAULT]\n"
            f"state_path = {self.workdir}\n"
            "[agent]\nmode = standalone\n"
            f"policy_file = {self.policy_path}\n"
            f"netns = {netns}\n"
            f"resync_interval = {resync_interval}\n"
            "[admin]\n"
            f"socket_path = {self.socket}\n"
            "[firewall]\n"
            f"backend = {backend}\n" + extra_conf)
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> AgentProcess:
        """Start the agent; `env` adds variables (NOTIFY_SOCKET, ...) to the test's own."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen([tool("hostfw-agent"), "--config-file", str(self.conf_path)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Until the agent answers and has applied at least once."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"hostfw-agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.request({"command": "status"})
                if last.get("ok") and last.get("generation", 0) > 0:
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready: {last}\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ operating

    def write_policy(self, policy: dict[str, Any]) -> None:
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(policy, sort_keys=False))
        os.replace(tmp, self.policy_path)

    def request(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One request on the admin socket (no CLI in between)."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`agent-ctl --socket <ours> ARGS`, as an operator would type it."""
        proc = subprocess.run([tool("agent-ctl"), "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=90)
        if check and proc.returncode != 0:
            raise AssertionError(f"agent-ctl {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stderr}\n{self.log()}")
        return proc

    def status(self) -> dict[str, Any]:
        """`status --json`; agent-ctl exits 1 while the agent is not in sync, which a
        test reads from the document itself."""
        return json.loads(self.ctl("status", "--json", check=False).stdout)

    def resync(self, timeout: float = 30.0) -> dict[str, Any]:
        reply = self.request({"command": "resync", "wait": True, "timeout": timeout},
                             timeout=timeout + 5)
        if not reply.get("ok"):
            raise AssertionError(f"resync failed: {reply}\n{self.log()}")
        return reply

    def apply_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        """Write a new policy file and wait until the kernel holds it."""
        self.write_policy(policy)
        return self.resync()

    def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}\n{self.log()}")

    # ------------------------------------------------------------ kernel views

    def save(self, family: int = 4, backend: str = "iptables-legacy") -> str:
        """iptables-save of the managed namespace (read only), see iptables_save."""
        binary = {"iptables-legacy": "iptables-legacy-save", "iptables-nft": "iptables-nft-save",
                  "iptc": "iptables-legacy-save"}[backend]
        if family == 6:
            binary = binary.replace("iptables", "ip6tables", 1)
        return iptables_save(self.netns, binary)


COUNTERS_RE = re.compile(r"\[\d+:\d+\]$")


def iptables_save(netns: str, binary: str) -> str:
    """`binary` (an *-save tool) in `netns`, without comment lines (timestamps).

    Built-in chain counters are zeroed: background traffic (IPv6 neighbour
    discovery, say) moves them, and they are not rules.
    """
    text = subprocess.run(["ip", "netns", "exec", netns, binary], capture_output=True,
                          text=True, check=True).stdout
    return "".join(COUNTERS_RE.sub("[0:0]", line) if line.startswith(":") else line
                   for line in text.splitlines(keepends=True) if not line.startswith("#"))


def assert_root_clean() -> None:
    """The root namespace holds no hostfw chain or hfw ipset (read only)."""
    leaks = []
    for save in SAVE_TOOLS:
        proc = subprocess.run([save], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if "hostfw" in line]
        if lines:
            leaks.append(f"{save}: {lines[:3]}")
    proc = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True)
    sets = [name for name in proc.stdout.split() if name.startswith("hfw")]
    if sets:
        leaks.append(f"ipset: {sets[:5]}")
    if leaks:
        raise AssertionError("hostfw objects leaked into the root namespace: " + "; ".join(leaks))

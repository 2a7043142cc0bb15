"""The RPC test stack: a real hostfw-controller and a real hostfw-agent over RabbitMQ.

Why processes: the tests must exercise what an operator runs (console
scripts, config files, the admin socket), with the broker in between. The
agent runs in the root namespace with `[agent] netns` = the node namespace,
so it reaches the broker on 127.0.0.1 while its rules land in the node; the
controller runs in the root namespace too. Logs go to files in the test's
tmp dir and are shown when a wait times out.

This module must not import pytest.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import oslo_messaging as messaging
from oslo_config import cfg

from agent.sources import rpc_api
from tests.support.agent import AgentProcess, iptables_save, tool
from tests.support.topology import VM, Topology

T = TypeVar("T")


def port(vm: VM, *groups: str, **extra: Any) -> dict[str, Any]:
    """A policy-file port for a VM; `device` is left to its default (tap + id[:11])."""
    return {"id": vm.port_id, "mac_address": vm.mac,
            "fixed_ips": [vm.ipv4] + ([vm.ipv6] if vm.ipv6 else []),
            "security_groups": list(groups), **extra}


def tcp_rule(port_number: int, **extra: Any) -> dict[str, Any]:
    return {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": port_number, "port_range_max": port_number, **extra}


EGRESS = [{"direction": "egress", "ethertype": "IPv4"},
          {"direction": "egress", "ethertype": "IPv6"}]


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             logs: Callable[[], str] = lambda: "", interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(interval)


def notifier_transport(url: str) -> messaging.Transport:
    """A transport of the test process's own, to cast at the agents directly."""
    messaging.set_transport_defaults(control_exchange=rpc_api.CONTROL_EXCHANGE)
    return messaging.get_rpc_transport(cfg.CONF, url=url)


class ControllerProcess:
    """`hostfw-controller` serving a policy file it owns."""

    def __init__(self, workdir: Path, transport_url: str, policy: dict[str, Any]) -> None:
        self.workdir = Path(workdir)
        self.policy_path = self.workdir / "controller-policy.json"
        self.conf_path = self.workdir / "controller.conf"
        self.log_path = self.workdir / "controller.log"
        self.write_policy(policy)
        self.conf_path.write_text(
            f"[DEFAULT]\ntransport_url = {transport_url}\nhost = controller-{os.getpid()}\n"
            f"[controller]\npolicy_file = {self.policy_path}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def write_policy(self, policy: dict[str, Any]) -> None:
        """Replace the file atomically, as a careful operator (or config tool) would."""
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(policy))
        os.replace(tmp, self.policy_path)

    def start(self) -> ControllerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [tool("hostfw-controller"), "--config-file", str(self.conf_path)],
                stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        wait_for(lambda: "answering security_group_info_for_devices" in self.log(),
                 timeout, "the controller to serve", self.log)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class RpcAgentProcess(AgentProcess):
    """`hostfw-agent` in rpc mode; reuses the standalone helper's operator tools."""

    def __init__(self, workdir: Path, netns: str, transport_url: str, *,
                 backend: str = "iptables-legacy", resync_interval: int = 30) -> None:
        # Not super().__init__: that one writes a standalone config and policy.
        self.workdir = Path(workdir)
        self.netns = netns
        self.socket = str(self.workdir / "agent.sock")
        self.conf_path = self.workdir / "agent.conf"
        self.log_path = self.workdir / "agent.log"
        self.backend = backend
        self.proc = None
        self.conf_path.write_text(
            f"[DEFAULT]\ntransport_url = {transport_url}\nhost = {netns}\n"
            f"state_path = {self.workdir}\n"
            f"[agent]\nmode = rpc\nnetns = {netns}\nresync_interval = {resync_interval}\n"
            f"[admin]\nsocket_path = {self.socket}\n"
            f"[firewall]\nbackend = {backend}\n")

    def source(self) -> dict[str, Any]:
        """The RPC source's part of the status."""
        return self.request({"command": "status"})["source"]

    def wait_converged(self, timeout: float = 20.0, ports: int | None = None) -> dict[str, Any]:
        """Until the agent pulled from the controller and applied it (all `ports` active)."""
        def done() -> dict[str, Any] | None:
            try:
                status = self.request({"command": "status"})
            except OSError:
                return None
            ok = (status.get("ok") and status["source"].get("connected")
                  and status.get("in_sync") and status.get("policy_loaded")
                  and (ports is None or status.get("ports_active") == ports))
            return status if ok else None
        return wait_for(done, timeout, "the agent to converge", self.log)

    def save(self, family: int = 4, backend: str | None = None) -> str:
        """iptables-save of the node (read only), see iptables_save."""
        mode = (backend or self.backend).removeprefix("iptables-")   # legacy | nft
        tool_name = "ip6tables" if family == 6 else "iptables"
        return iptables_save(self.netns, f"{tool_name}-{mode}-save")


@dataclass
class Stack:
    """Three VMs on one node, the controller serving their policy, the agent enforcing it."""

    topology: Topology
    controller: ControllerProcess
    agent: RpcAgentProcess
    base: dict[str, Any]

    @property
    def client(self) -> VM:
        return self.topology.vms["client"]

    @property
    def server(self) -> VM:
        return self.topology.vms["server"]

    @property
    def other(self) -> VM:
        return self.topology.vms["other"]

    def policy(self) -> dict[str, Any]:
        """A copy of the starting policy to edit."""
        return copy.deepcopy(self.base)

    def logs(self) -> str:
        return (f"--- agent log\n{self.agent.log()}\n"
                f"--- controller log\n{self.controller.log()}")


def base_policy(client: VM, server: VM, other: VM) -> dict[str, Any]:
    return {
        "security_groups": {
            "sg-server": [*EGRESS],
            "sg-client": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
                          *EGRESS],
        },
        "ports": [port(client, "sg-client"), port(server, "sg-server"),
                  port(other, "sg-client")],
    }

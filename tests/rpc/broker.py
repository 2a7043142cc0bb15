"""A private RabbitMQ node on loopback for the RPC tests (and the compat test).

Rules of this room:

* Every test session starts a RabbitMQ node of its own (the Debian package's
  `rabbitmq-server -detached`, node `hfwt-<pid>`, free ports, data in a tmp
  dir) and stops it at the end. The broker-fault test stops and starts the
  RabbitMQ application, which would break anything else sharing a broker: a
  private node touches no other session, no other user and not the
  machine's default node. It costs ~10 s at start.
* Loopback only: AMQP, epmd and Erlang distribution all bind to 127.0.0.1.
* `stop_app`/`start_app` (seconds) stand in for a broker outage;
  `ensure_app_running` puts the app back, and teardown calls it whatever
  happened. Nodes left by killed sessions (their pid is gone) are stopped
  when the next session starts.

This module must not import pytest: it is plain support code.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.topology import pid_alive

HOST = "127.0.0.1"
NODE_PREFIX = "hfwt-"


def skip_reason() -> str | None:
    """Why a broker cannot be had here, or None."""
    if os.geteuid() != 0:
        return "RPC tests need root (they start a rabbitmq-server node)"
    for tool in ("rabbitmq-server", "rabbitmqctl", "epmd"):
        if shutil.which(tool) is None:
            return f"RPC tests need {tool} (run make deps)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


class Broker:
    """One private RabbitMQ node; `url` is its AMQP address."""

    def __init__(self) -> None:
        self.host = socket.gethostname().split(".")[0]
        self.node = f"{NODE_PREFIX}{os.getpid()}@{self.host}"
        self.port = free_port()
        self.dist_port = free_port()
        self.workdir = tempfile.mkdtemp(prefix=f"{NODE_PREFIX}{os.getpid()}-rabbitmq-")

    @property
    def url(self) -> str:
        return f"rabbit://guest:guest@{HOST}:{self.port}/"

    def ctl(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`rabbitmqctl -n <our node> ARGS`."""
        return _ctl("-n", self.node, *args, check=check, timeout=timeout)

    def setup(self, timeout: float = 90.0) -> None:
        stop_leftovers()
        # The Debian wrapper runs the node as the rabbitmq user.
        user = pwd.getpwnam("rabbitmq")
        os.chown(self.workdir, user.pw_uid, user.pw_gid)
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": HOST,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": f"{self.workdir}/mnesia",
            "RABBITMQ_LOG_BASE": f"{self.workdir}/log",
            "RABBITMQ_PID_FILE": f"{self.workdir}/pid",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{self.workdir}/enabled_plugins",
        }
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True,
                       capture_output=True, timeout=60)
        self.wait_app(timeout)

    def wait_app(self, timeout: float) -> None:
        """Until the node's RabbitMQ application accepts AMQP connections."""
        deadline = time.monotonic() + timeout
        while not port_open(self.port):   # cheap; rabbitmqctl costs a second a call
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not come up within "
                                   f"{timeout:.0f} s; logs in {self.workdir}/log")
            time.sleep(0.2)
        self.ctl("await_startup", "--timeout", str(int(max(1, deadline - time.monotonic()))))

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_app(60)

    def ensure_app_running(self) -> None:
        if not port_open(self.port):
            self.start_app()

    def teardown(self) -> None:
        self.ctl("stop", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ctl(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def stop_leftovers() -> list[str]:
    """Stop `hfwt-<pid>` nodes whose session is gone (killed test runs)."""
    names = subprocess.run(["epmd", "-names"], capture_output=True, text=True,
                           check=False).stdout
    host = socket.gethostname().split(".")[0]
    stopped = []
    for pid in re.findall(rf"^name {NODE_PREFIX}(\d+) at port", names, re.MULTILINE):
        if not pid_alive(int(pid)):
            node = f"{NODE_PREFIX}{pid}@{host}"
            _ctl("-n", node, "stop", check=False)
            stopped.append(node)
    return stopped


@contextmanager
def running_broker() -> Iterator[Broker]:
    """A started private node, torn down on exit whatever happened."""
    broker = Broker()
    try:
        broker.setup()
        yield broker
    finally:
        broker.teardown()

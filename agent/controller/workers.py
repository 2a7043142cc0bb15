"""Answer pulls from several processes (`[controller] rpc_workers`).

Why: one Python process answers on one core (the GIL), and oslo.messaging's
own work per call (AMQP frames, dispatch, the confirmed reply publish) is
about a millisecond, so a single process cannot answer a thousand agents'
simultaneous pulls within a second. Several consumers on the q-plugin
queue let the broker spread the calls, as Neutron's `rpc_workers` does.

Rules of this room:

1. Workers are fresh processes (`python -m agent.controller.workers` with the
   controller's own arguments), never forks: the controller has threads and
   AMQP connections by the time a worker must be replaced.
2. The controller keeps the file watch, the diff and the casts; workers only
   answer. Each reload's policy is sent to every worker (pickled, over its
   stdin: a pipe between the controller and its own child) and the casts go
   out only after every worker has confirmed the swap, so an agent that
   pulls because of a cast never gets the previous version.
3. A worker that does not confirm within `SWAP_TIMEOUT`, or whose pipe is
   gone, is killed and replaced (it gets the policy in force at start). A
   worker exits when its stdin closes, so it never outlives the controller.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import BinaryIO

from agent.model import Policy

LOG = logging.getLogger("hostfw.controller.workers")
SWAP_TIMEOUT = 30.0
HEADER = struct.Struct("!QQ")   # version, payload length


class Worker:
    """One answering process and its pipes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.controller.workers", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, version: int, payload: bytes) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(HEADER.pack(version, len(payload)) + payload)
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    def confirmed(self, version: int, deadline: float) -> bool:
        """Until the worker says it serves `version` (or the deadline passes)."""
        assert self.proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0.0))
            if not ready:
                return False
            line = self.proc.stdout.readline()
            if not line:
                return False
            if line.strip() == f"serving {version}".encode():
                return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass   # unsent bytes for a dead worker: nobody to deliver them to


class AnswerWorkers:
    """`count` workers serving the policy last `publish`ed."""

    def __init__(self, count: int, argv: list[str]) -> None:
        self.count = count
        self.argv = argv
        self.version = 0
        self.payload = b""
        self.workers: list[Worker] = []
        self._lock = threading.Lock()

    def publish(self, policy: Policy) -> None:
        """Hand `policy` to every worker and return once all of them serve it."""
        with self._lock:
            self.version += 1
            self.payload = pickle.dumps(policy, protocol=pickle.HIGHEST_PROTOCOL)
            while len(self.workers) < self.count:
                self.workers.append(Worker(self.argv))
            deadline = time.monotonic() + SWAP_TIMEOUT
            sent = [w for w in self.workers if w.send(self.version, self.payload)]
            for worker in self.workers:
                if worker in sent and worker.confirmed(self.version, deadline):
                    continue
                LOG.error("answer worker %d did not take policy version %d; replacing it",
                          worker.proc.pid, self.version)
                worker.kill()
                self._replace(worker, deadline)

    def _replace(self, dead: Worker, deadline: float) -> None:
        fresh = Worker(self.argv)
        self.workers[self.workers.index(dead)] = fresh
        if not (fresh.send(self.version, self.payload)
                and fresh.confirmed(self.version, deadline + SWAP_TIMEOUT)):
            LOG.error("replacement answer worker %d failed too", fresh.proc.pid)

    def stop(self) -> None:
        with self._lock:
            for worker in self.workers:
                if worker.proc.poll() is None:
                    worker.proc.terminate()
            for worker in self.workers:
                try:
                    worker.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()
            self.workers = []


# ---------------------------------------------------------------- the worker process

def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(argv: list[str]) -> int:
    """A worker: answer on q-plugin with each policy its controller sends."""
    import oslo_messaging as messaging
    from oslo_log import log as oslo_logging

    from agent.controller import main as controller_main
    from agent.controller.endpoint import SecurityGroupInfo, Snapshot
    from agent.sources import rpc_api

    conf = controller_main.parse_args(argv)
    oslo_logging.setup(conf, "hostfw")   # as the controller; stdout stays the ack pipe's
    transport = rpc_api.make_transport(conf)
    current = [Snapshot()]
    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, server=conf.host),
        [SecurityGroupInfo(lambda: current[0])])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    started = False
    while True:
        header = _read_exactly(stdin, HEADER.size)
        if header is None:
            break   # the controller is gone
        version, length = HEADER.unpack(header)
        payload = _read_exactly(stdin, length)
        if payload is None:
            break
        current[0] = Snapshot.of(pickle.loads(payload))   # from our own parent only
        if not started:   # answer only once a policy is in force
            threading.Thread(target=controller_main._serve, name="rpc-server", daemon=True,
                             args=(server, f"{rpc_api.SG_INFO_METHOD} on "
                                           f"{rpc_api.PLUGIN_TOPIC}")).start()
            started = True
        stdout.write(f"serving {version}\n".encode())
        stdout.flush()
    os._exit(0)   # no slow oslo shutdown: nothing is left to answer for


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))

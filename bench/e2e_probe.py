"""The end-to-end benchmark's packet waiter, run *inside* a VM namespace.

Rules of this room: stdlib only, never imports the rest of the tree (it runs
as `ip netns exec VM python -I -S e2e_probe.py ...`, like
tests/support/netprobe.py, because a Python thread cannot enter a namespace).
Every time is `time.time()`: CLOCK_REALTIME is the same in every namespace,
so the bench process, this waiter and the agent's log share one clock.

Sub-commands::

    echo --udp PORT...
        Echo every UDP datagram back to its sender; no logging (thousands of
        datagrams a second). Prints READY once every socket is bound.
    stream DST PORT [--bind SRC] [--interval S] [--fresh]
        Send a numbered datagram every S seconds and print
        `R <seq> <sent> <received>` for each echo as it arrives, so the bench
        sees the first packet through at once. On EOF of stdin it stops
        sending, waits --grace seconds for late echoes, prints
        `S <json list of send times>` and exits. With --fresh every datagram
        leaves from a new socket (a new conntrack flow): a flow that started
        before the rules existed would otherwise stay ESTABLISHED and pass.
        Its source ports count up from --sport-base, never reused within a
        stream: a kernel-chosen port may be one whose earlier flow is still
        in the conntrack table, and that packet would pass as ESTABLISHED.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys
import threading
import time

MAGIC = b"hfwe2e"
PACKET = struct.Struct("!6sQ")


def echo(ports: list[int]) -> int:
    sel = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)
            except OSError:
                continue


class Streamer:
    """Sends numbered datagrams on a fixed cadence and reports their echoes."""

    def __init__(self, dst: str, port: int, bind: str | None, interval: float,
                 fresh: bool, grace: float, sport_base: int = 40000) -> None:
        self.dst = (dst, port)
        self.bind = bind
        self.interval = interval
        self.fresh = fresh
        self.grace = grace
        self.sport_base = sport_base
        self.sel = selectors.DefaultSelector()
        self.sent: list[float] = []
        self.open: list[tuple[float, socket.socket]] = []   # fresh sockets, oldest first
        self.stop = threading.Event()
        self.shared = None if fresh else self._socket()

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sport = 0
        if self.fresh:
            sport = 1024 + (self.sport_base + len(self.sent) - 1024) % (65536 - 1024)
        if self.bind or sport:
            sock.bind((self.bind or "0.0.0.0", sport))
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ)
        return sock

    def _send(self) -> None:
        seq = len(self.sent)
        sock = self.shared or self._socket()
        now = time.time()
        self.sent.append(now)
        try:
            sock.sendto(PACKET.pack(MAGIC, seq), self.dst)
        except OSError:   # no route or neighbour yet: counts as a packet not through
            pass
        if self.fresh:
            self.open.append((now, sock))

    def _receive(self, timeout: float) -> None:
        for key, _ in self.sel.select(max(0.0, timeout)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(2048)
            except OSError:
                continue
            got = time.time()
            if len(data) != PACKET.size:
                continue
            magic, seq = PACKET.unpack(data)
            if magic == MAGIC and seq < len(self.sent):
                sys.stdout.write(f"R {seq} {self.sent[seq]:.6f} {got:.6f}\n")
                sys.stdout.flush()

    def _close_old(self, before: float) -> None:
        while self.open and self.open[0][0] < before:
            _, sock = self.open.pop(0)
            self.sel.unregister(sock)
            sock.close()

    def run(self) -> None:
        print("READY", flush=True)
        next_at = time.time()
        while not self.stop.is_set():
            now = time.time()
            if now >= next_at:
                self._send()
                next_at = max(next_at + self.interval, now)
                self._close_old(now - self.grace)
            self._receive(next_at - time.time())
        end = time.time() + self.grace
        while (left := end - time.time()) > 0:
            self._receive(left)
        print("S " + json.dumps([round(t, 6) for t in self.sent]), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e_probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--udp", type=int, action="append", default=[])
    p = sub.add_parser("stream")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--bind")
    p.add_argument("--interval", type=float, default=0.002)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--grace", type=float, default=0.25)
    p.add_argument("--sport-base", type=int, default=40000)
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        return echo(args.udp)
    streamer = Streamer(args.dst, args.port, args.bind, args.interval, args.fresh, args.grace,
                        args.sport_base)

    def wait_eof() -> None:
        sys.stdin.read()
        streamer.stop.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    streamer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

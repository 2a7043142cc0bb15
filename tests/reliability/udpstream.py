"""Sequenced UDP streams for the reliability tests, run *inside* a VM namespace.

Like tests/support/netprobe.py this is stdlib only and started with
``ip netns exec NS python3 -I -S udpstream.py ...``, because a socket can only
be put in another namespace by a process living there.

Sub-commands::

    echo --port P [--port P ...] --log FILE
        Echo every datagram back and append ``PORT SRC SEQ`` per datagram to
        FILE (flushed per line), so a test can count what got through, from
        whom, even for streams whose echoes are dropped on the way back.
        Prints READY once bound.
    send DST PORT --rate R [--duration S] [--grace G]
        Send ``seq:N`` datagrams at R per second until the duration ends or
        SIGTERM/SIGINT arrives, keep reading echoes, wait G seconds for the
        last ones, then print one JSON line: sent, echoed, missing (the first
        50 sequence numbers never echoed) and first_send/last_send times.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
import time


def echo(ports: list[int], log_path: str) -> int:
    sel = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, port)
    log = open(log_path, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - lives forever
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data, peer = sock.recvfrom(2048)
            except OSError:
                continue
            seq = data.decode("ascii", "replace").partition(":")[2]
            log.write(f"{key.data} {peer[0]} {seq}\n")
            try:
                sock.sendto(data, peer)
            except OSError:
                pass


def send(dst: str, port: int, rate: float, duration: float, grace: float) -> int:
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    echoed: set[int] = set()
    sent = 0
    interval = 1.0 / rate
    start = time.monotonic()
    first_send = time.time()
    next_at = start

    def drain() -> None:
        while True:
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            tag, _, seq = data.decode("ascii", "replace").partition(":")
            if tag == "seq" and seq.isdigit():
                echoed.add(int(seq))

    while not stop and time.monotonic() - start < duration:
        now = time.monotonic()
        if now >= next_at:
            try:
                sock.sendto(f"seq:{sent}".encode(), (dst, port))
            except OSError:
                pass  # counted as sent: a local send error is a loss too
            sent += 1
            next_at += interval
        drain()
        time.sleep(max(0.0, min(next_at - time.monotonic(), 0.002)))
    last_send = time.time()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and len(echoed) < sent:
        drain()
        time.sleep(0.01)
    missing = [n for n in range(sent) if n not in echoed]
    print(json.dumps({"sent": sent, "echoed": len(echoed & set(range(sent))),
                      "missing": missing[:50], "missing_count": len(missing),
                      "first_send": first_send, "last_send": last_send}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udpstream")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--log", required=True)
    p = sub.add_parser("send")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--grace", type=float, default=1.5)
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        return echo(args.port, args.log)
    return send(args.dst, args.port, args.rate, args.duration, args.grace)


if __name__ == "__main__":
    sys.exit(main())

"""Stand-alone traffic helper run *inside* a test namespace.

tests/support/topology.py launches this file with ``ip netns exec NS python3
netprobe.py ...``: Python 3.11 has no ``os.setns``, so the only way to put a
socket in another network namespace is a separate process. It is stdlib only
and never imports the rest of the test tree, so it runs with any python3.

Sub-commands::

    serve --tcp PORT... --udp PORT... --log FILE
        Listen on every port over IPv4 and IPv6, echo what arrives and append
        ``PROTO PORT SRC_IP SRC_PORT`` per connection/datagram to FILE, so a
        test can ask afterwards which sources got through the firewall.
        Prints ``READY`` once every socket is bound.
    tcp DST PORT [--timeout S] [--bind SRC]
        Exit 0 when the TCP handshake completes, 1 otherwise.
    udp DST PORT [--timeout S] [--bind SRC] [--no-reply]
        Send a datagram and exit 0 when the echo comes back (or, with
        --no-reply, as soon as it was sent: used for spoofed sources whose
        replies cannot come back).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import threading


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _Log:
    """Line-buffered, thread-safe peer log (one line per flow)."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "a", buffering=1, encoding="ascii")
        self._lock = threading.Lock()

    def record(self, proto: str, port: int, peer: tuple) -> None:
        with self._lock:
            self._fh.write(f"{proto} {port} {peer[0]} {peer[1]}\n")
            self._fh.flush()


def _echo_tcp(conn: socket.socket) -> None:
    conn.settimeout(5.0)
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def serve(tcp: list[int], udp: list[int], log_path: str) -> int:
    log = _Log(log_path)
    sel = selectors.DefaultSelector()
    for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for proto, ports, kind in (("tcp", tcp, socket.SOCK_STREAM),
                                   ("udp", udp, socket.SOCK_DGRAM)):
            for port in ports:
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # Separate v4 and v6 sockets: peers are then logged as
                    # plain addresses, never as ::ffff:a.b.c.d.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((any_addr, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(64)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, (proto, port))
    print("READY", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            proto, port = key.data
            try:
                if proto == "tcp":
                    conn, peer = sock.accept()
                    log.record(proto, port, peer)
                    conn.setblocking(True)
                    threading.Thread(target=_echo_tcp, args=(conn,),
                                     daemon=True).start()
                else:
                    data, peer = sock.recvfrom(65535)
                    log.record(proto, port, peer)
                    sock.sendto(data, peer)
            except OSError:
                continue


def tcp_client(dst: str, port: int, timeout: float, bind: str | None) -> int:
    sock = socket.socket(_family(dst), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if bind:
            sock.bind((bind, 0))
        sock.connect((dst, port))
    except OSError:
        return 1
    finally:
        sock.close()
    return 0


def udp_client(dst: str, port: int, timeout: float, bind: str | None,
               no_reply: bool) -> int:
    sock = socket.socket(_family(dst), socket.SOCK_DGRAM)
    if bind:
        sock.bind((bind, 0))
    payload = b"hfwt-probe"
    attempts = 3
    # Several sends inside the timeout: the first datagram may sit in the
    # neighbour queue while ARP/ND resolves; repeats are harmless.
    try:
        for _ in range(attempts):
            sock.sendto(payload, (dst, port))
            if no_reply:
                continue
            sock.settimeout(timeout / attempts)
            try:
                while sock.recvfrom(65535)[0] != payload:
                    pass
                return 0
            except TimeoutError:
                continue
    finally:
        sock.close()
    return 0 if no_reply else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netprobe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--tcp", type=int, action="append", default=[])
    p.add_argument("--udp", type=int, action="append", default=[])
    p.add_argument("--log", required=True)
    for name in ("tcp", "udp"):
        p = sub.add_parser(name)
        p.add_argument("dst")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=1.0)
        p.add_argument("--bind")
        if name == "udp":
            p.add_argument("--no-reply", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.tcp, args.udp, args.log)
    if args.cmd == "tcp":
        return tcp_client(args.dst, args.port, args.timeout, args.bind)
    return udp_client(args.dst, args.port, args.timeout, args.bind,
                      args.no_reply)


if __name__ == "__main__":
    sys.exit(main())

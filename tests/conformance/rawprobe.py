"""Packet tools the conformance suite needs beyond ``tests/support/netprobe.py``.

Run *inside* a test namespace (``ip netns exec NS python3 -I -S rawprobe.py``),
like netprobe and for the same reason: Python 3.11 cannot ``setns`` a thread.
Stdlib only, so it starts fast and never imports the test tree.

Why these exist: Neutron's functional tests judge the firewall with packets a
plain socket cannot produce or observe. A DHCP discover comes from 0.0.0.0, a
DHCP client or server uses fixed source ports, an ICMP type other than echo
needs a raw socket, RELATED ICMP shows only as ``ECONNREFUSED`` on a connected
socket, and an established-connection cut needs one TCP connection kept open
across a policy change. Sub-commands::

    udp-send DST PORT [--src A] [--sport N] [--dev IF] [--count N] [--broadcast]
        Send datagrams (no reply expected); link-local DST/--src use --dev's scope.
    dhcp-discover --dev IF [--sport 68] [--dport 67]
        One Ethernet frame: IPv4 0.0.0.0 -> 255.255.255.255, UDP sport -> dport,
        from IF's MAC; written with AF_PACKET, so the VM's IP stack is bypassed.
    icmp-send DST TYPE [--code C]
        One ICMP (IPv4) or ICMPv6 message of that type through a raw socket.
    icmp-sniff --log FILE
        Log ``SRC TYPE CODE`` for every ICMP/ICMPv6 message that arrives;
        prints READY once both raw sockets are open.
    connect tcp|udp DST PORT [--timeout S]
        Prints ``ok`` (handshake done / echo back), ``refused`` (RST or ICMP
        unreachable: ECONNREFUSED) or ``timeout``.
    session DST PORT [--timeout S]
        Opens one TCP connection to an echo server and prints CONNECTED and
        its source port (or FAILED). Then, per line ``SECONDS`` on stdin, sends a token and prints
        OK (echoed in time), TIMEOUT or CLOSED.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import time

PAYLOAD = b"hfwt-conformance"


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _sockaddr(addr: str, port: int, dev: str | None) -> tuple:
    """A sockaddr tuple; IPv6 link-local addresses get the scope of ``dev``."""
    if _family(addr) == socket.AF_INET:
        return (addr, port)
    scope = socket.if_nametoindex(dev) if dev and addr.lower().startswith("fe80") else 0
    return (addr, port, 0, scope)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# ---------------------------------------------------------------- senders

def udp_send(dst: str, port: int, src: str | None, sport: int, dev: str | None,
             count: int, broadcast: bool) -> int:
    family = _family(dst)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if dev:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    any_addr = "0.0.0.0" if family == socket.AF_INET else "::"
    sock.bind(_sockaddr(src or any_addr, sport, dev))
    # Several sends: the first may wait in the neighbour queue while ARP/ND
    # resolves, and a lone datagram can be lost to that.
    for _ in range(count):
        try:
            sock.sendto(PAYLOAD, _sockaddr(dst, port, dev))
        except OSError:
            pass  # e.g. EPERM from a local firewall: arrival is what counts
        time.sleep(0.05)
    sock.close()
    return 0


def dhcp_discover(dev: str, sport: int, dport: int) -> int:
    mac = bytes.fromhex(open(f"/sys/class/net/{dev}/address").read().strip().replace(":", ""))
    udp_len = 8 + len(PAYLOAD)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + PAYLOAD  # checksum 0: none
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0x1234, 0, 64,
                         socket.IPPROTO_UDP, 0, bytes(4), b"\xff" * 4)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    frame = b"\xff" * 6 + mac + b"\x08\x00" + header + udp
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((dev, 0))
    for _ in range(3):
        sock.send(frame)
        time.sleep(0.05)
    sock.close()
    return 0


def icmp_send(dst: str, kind: int, code: int) -> int:
    if _family(dst) == socket.AF_INET:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        body = struct.pack("!BBHHH", kind, code, 0, os.getpid() & 0xFFFF, 1) + PAYLOAD
        body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    else:  # the kernel fills in the ICMPv6 checksum
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        body = struct.pack("!BBHHH", kind, code, 0, os.getpid() & 0xFFFF, 1) + PAYLOAD
    for _ in range(3):
        try:
            sock.sendto(body, _sockaddr(dst, 0, None))
        except OSError:
            pass
        time.sleep(0.05)
    sock.close()
    return 0


# ---------------------------------------------------------------- observers

def icmp_sniff(log_path: str) -> int:
    s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    print("READY", flush=True)
    with open(log_path, "a", buffering=1, encoding="ascii") as log:
        while True:
            ready, _, _ = select.select([s4, s6], [], [])
            for sock in ready:
                data, peer = sock.recvfrom(65535)
                offset = (data[0] & 0x0F) * 4 if sock is s4 else 0  # v4 keeps the IP header
                if len(data) >= offset + 2:
                    src = peer[0].split("%")[0]
                    log.write(f"{src} {data[offset]} {data[offset + 1]}\n")


def connect(proto: str, dst: str, port: int, timeout: float) -> str:
    family = _family(dst)
    if proto == "tcp":
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(_sockaddr(dst, port, None))
            return "ok"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "timeout"
        finally:
            sock.close()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect(_sockaddr(dst, port, None))
    try:
        for _ in range(3):
            try:
                sock.send(PAYLOAD)
                sock.settimeout(timeout / 3)
                if sock.recv(65535) == PAYLOAD:
                    return "ok"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                continue
        return "timeout"
    finally:
        sock.close()


def session(dst: str, port: int, timeout: float) -> int:
    try:
        sock = socket.create_connection((dst, port), timeout=timeout)
    except OSError as exc:
        print(f"FAILED {exc}", flush=True)
        return 1
    print(f"CONNECTED {sock.getsockname()[1]}", flush=True)
    for n, line in enumerate(sys.stdin):
        wait = float(line.strip() or timeout)
        token = f"token-{n}-{os.getpid()}\n".encode()
        try:
            sock.settimeout(wait)
            sock.sendall(token)
            got = b""
            while len(got) < len(token):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
            print("OK" if got == token else "CLOSED", flush=True)
        except TimeoutError:
            print("TIMEOUT", flush=True)
        except OSError as exc:
            print(f"CLOSED {exc}", flush=True)
    sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rawprobe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("udp-send")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--src")
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--dev")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--broadcast", action="store_true")
    p = sub.add_parser("dhcp-discover")
    p.add_argument("--dev", required=True)
    p.add_argument("--sport", type=int, default=68)
    p.add_argument("--dport", type=int, default=67)
    p = sub.add_parser("icmp-send")
    p.add_argument("dst")
    p.add_argument("type", type=int)
    p.add_argument("--code", type=int, default=0)
    p = sub.add_parser("icmp-sniff")
    p.add_argument("--log", required=True)
    p = sub.add_parser("connect")
    p.add_argument("proto", choices=("tcp", "udp"))
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("session")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.cmd == "udp-send":
        return udp_send(args.dst, args.port, args.src, args.sport, args.dev, args.count,
                        args.broadcast)
    if args.cmd == "dhcp-discover":
        return dhcp_discover(args.dev, args.sport, args.dport)
    if args.cmd == "icmp-send":
        return icmp_send(args.dst, args.type, args.code)
    if args.cmd == "icmp-sniff":
        return icmp_sniff(args.log)
    if args.cmd == "connect":
        print(connect(args.proto, args.dst, args.port, args.timeout), flush=True)
        return 0
    return session(args.dst, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

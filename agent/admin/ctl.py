"""agent-ctl: the operator's CLI over the admin socket (CONTRACT 6).

Rules of this room: a thin client. It sends one JSON request, prints the
answer as a human table or, with `--json`, exactly what the socket returned.
Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage. `status`
is a failure when the agent is not in sync, so `agent-ctl status` alone is a
health check for scripts; the table (or JSON) is printed either way.

`--timeout S` has one meaning wherever it is given (before the command, as
`agent-ctl --timeout S`, or after `resync`, as CONTRACT 6 writes it): the
longest agent-ctl waits for the answer. `resync --wait` hands it to the agent
as its deadline for the resync.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from typing import Any

from oslo_config import cfg

from agent import config, version_line
from agent.admin import diff

DEFAULT_SOCKET = "/run/hostfw/agent.sock"
DEFAULT_TIMEOUT = 10.0       # seconds for an answer
DEFAULT_RESYNC_WAIT = 60.0   # seconds for `resync --wait`: a full resync of a large node
ANSWER_MARGIN = 5.0          # the agent's own "not done in time" answer must still arrive


class CtlError(RuntimeError):
    """A failure to report on one line and exit 1."""


def call(path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise CtlError(f"the agent is not running (no socket at {path})") from None
    except ConnectionRefusedError:
        raise CtlError(f"the agent is not running (nobody listens on {path})") from None
    except TimeoutError:
        raise CtlError(f"the agent did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise CtlError(f"cannot talk to the agent at {path}: {exc}") from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise CtlError("the agent sent an unreadable answer") from None


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if args.config_file:
        conf = cfg.ConfigOpts()
        config.register_opts(conf)
        conf(["--config-file", args.config_file], project="hostfw",
             default_config_files=[])
        return conf.admin.socket_path
    return DEFAULT_SOCKET


def _ago(stamp: float | None) -> str:
    return "never" if stamp is None else f"{time.time() - stamp:.1f} s ago"


def print_status(reply: dict[str, Any]) -> None:
    rows = [
        ("mode", reply.get("mode")), ("backend", reply.get("backend")),
        ("netns", reply.get("netns") or "(own)"), ("in sync", reply.get("in_sync")),
        ("generation", reply.get("generation")), ("ports active", reply.get("ports_active")),
        ("ports known", reply.get("ports_known")), ("devices", reply.get("devices")),
        ("unknown devices", ", ".join(reply.get("unknown_devices") or []) or "-"),
        ("rules", reply.get("rules")), ("ipsets", reply.get("ipsets")),
        ("last apply ok", _ago(reply.get("last_apply_ok_at"))),
        ("drift repairs", f"{reply.get('drift_repairs', 0)} (last "
                          f"{_ago(reply.get('last_drift_repair_at'))})"),
    ]
    source = reply.get("source") or {}
    for key, value in sorted(source.items()):
        if key != "error":
            rows.append((f"source {key}", value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    errors = reply.get("errors") or []
    print(f"{'errors':<{width}}  {len(errors)}")
    for error in errors:
        print(f"  - {error}")


def print_ports(reply: dict[str, Any]) -> None:
    ports = reply.get("ports", [])
    header = ("DEVICE", "PORT", "STATE", "IPS", "GROUPS")
    rows = [(p["device"], p["id"], p["state"], ",".join(p["fixed_ips"]),
             ",".join(p["security_groups"])) for p in ports]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())


def print_chains(tables: dict[str, dict[str, list[str]]]) -> None:
    for table, chains in tables.items():
        print(f"# {table}")
        for chain, rules in chains.items():
            print(f":{chain}")
            for rule in rules:
                print(f"-A {chain} {rule}")


def print_dump(reply: dict[str, Any]) -> None:
    for table, body in reply.get("tables", {}).items():
        print(f"# {table}")
        for hook in body["hooks"]:
            print(hook)
        for chain, rules in body["chains"].items():
            print(f":{chain}")
            for rule in rules:
                print(f"-A {chain} {rule}")
    for name, body in reply.get("ipsets", {}).items():
        print(f"# ipset {name} ({body['family']}, {body['type']}): "
              f"{' '.join(body['members']) or '(empty)'}")


HOOKS = {"FORWARD": "bridged through the node (filter FORWARD)",
         "INPUT": "to this node (filter INPUT)", "OUTPUT": "from this node (filter OUTPUT)"}


def print_trace(reply: dict[str, Any]) -> None:
    packet = reply["packet"]
    what = f"{packet['proto']} {packet['src']} -> {packet['dst']}"
    if packet["icmp_type"] is not None:
        what += f" type {packet['icmp_type']}/{packet['icmp_code']}"
    if packet["dport"] is not None or packet["sport"] is not None:
        what += (f" sport {packet['sport'] if packet['sport'] is not None else 'any'}"
                 f" dport {packet['dport'] if packet['dport'] is not None else 'any'}")
    rows = [("packet", f"{what}, IPv{packet['family']}, conntrack {packet['ctstate']}"),
            ("from", reply["from"]), ("to", reply["to"]), ("path", HOOKS[packet["hook"]])]
    rows += [("note", note) for note in reply.get("notes", [])]
    if not reply.get("in_sync"):
        rows.append(("warning", "the last apply did not leave the kernel in sync; this "
                                "traces the agent's ruleset (agent-ctl diff: the difference)"))
    for key, value in rows:
        print(f"{key:<8} {value}")
    print()
    for number, step in enumerate(reply["steps"], 1):
        print(f"{number:>3} {step['table']}/{step['chain']}: {step['effect']}")
        if step["rule"]:
            print(f"      -A {step['chain']} {step['rule']}")
    print()
    print(f"verdict: {reply['verdict']} ({reply['reason']})")


def icmp_type(text: str) -> tuple[int, int]:
    """`--icmp-type TYPE[/CODE]`; the code defaults to 0."""
    kind, _, code = text.partition("/")
    if not kind.isdigit() or int(kind) > 255 or code and (not code.isdigit() or int(code) > 255):
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE or TYPE/CODE (0 to 255)")
    return int(kind), int(code or 0)


def trace_request(args: argparse.Namespace) -> dict[str, Any]:
    request = {key: getattr(args, key) for key in
               ("port", "proto", "direction", "src", "dst", "sport", "dport", "ctstate",
                "peer", "src_mac") if getattr(args, key) is not None}
    if args.icmp_type:
        request["icmp_type"], request["icmp_code"] = args.icmp_type
    return request


def seconds(text: str) -> float:
    """`--timeout S`: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


JSON_HELP = "print the agent's answer as JSON, exactly as the socket returned it"
TIMEOUT_HELP = (f"seconds to wait for the agent's answer (default {DEFAULT_TIMEOUT:g}; "
                f"resync --wait {DEFAULT_RESYNC_WAIT:g}, which is also the agent's deadline "
                f"for the resync)")
COMMANDS = {  # the commands whose only option is --json: name -> help
    "status": "mode, backend, ports, generation, last apply, errors; exit 1 when the "
              "agent is not in sync with the kernel",
    "ports": "local ports with device, state, addresses and groups",
    "dump": "the whole compiled ruleset and ipsets",
    "diff": "what a resync would change in the kernel, without changing it",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-ctl", description="Drive a hostfw-agent through its admin socket.",
        epilog="exit status: 0 success, 1 failure (reason on stderr), 2 bad usage")
    parser.add_argument("--version", action="version", version=version_line("agent-ctl"),
                        help="print agent-ctl's version and exit")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help=f"the agent's admin socket (default {DEFAULT_SOCKET})")
    where.add_argument("--config-file", metavar="FILE",
                       help="read the socket path from this agent config ([admin] "
                            "socket_path)")
    parser.add_argument("--timeout", type=seconds, metavar="S", help=TIMEOUT_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", help=JSON_HELP)
    text = "full resync: re-read the policy source and the kernel, recompile, repair drift"
    resync = sub.add_parser("resync", help=text, description=text)
    resync.add_argument("--wait", action="store_true",
                        help="return when the resync is done; exit 0 only if the kernel "
                             "then matches (default: only queue it)")
    # The same option as the global one (same dest; SUPPRESS keeps an absent one
    # from overwriting it): CONTRACT 6 writes `resync [--wait] [--timeout S]`.
    resync.add_argument("--timeout", type=seconds, metavar="S", default=argparse.SUPPRESS,
                        help=TIMEOUT_HELP)
    resync.add_argument("--json", action="store_true", help=JSON_HELP)
    text = "one port's chains and rules as applied"
    show = sub.add_parser("show", help=text, description=text)
    show.add_argument("port", help="port id or device name")
    show.add_argument("--json", action="store_true", help=JSON_HELP)
    text = "walk one packet through the compiled ruleset: the deciding rules and the verdict"
    trace = sub.add_parser("trace", help=text, description=text)
    trace.add_argument("port", help="the local port (id or device) receiving (ingress) or "
                                    "sending (egress) the packet")
    trace.add_argument("--proto", required=True, help="tcp, udp, icmp, ... or a number")
    trace.add_argument("--src", help="source address (default for egress: the port's)")
    trace.add_argument("--dst", help="destination address (default for ingress: the port's)")
    trace.add_argument("--sport", type=int, help="source port (default: any unprivileged)")
    trace.add_argument("--dport", type=int, help="destination port")
    trace.add_argument("--direction", choices=("ingress", "egress"), default="ingress",
                       help="to the port (default) or from it")
    trace.add_argument("--icmp-type", type=icmp_type, metavar="TYPE[/CODE]",
                       help="default: echo request")
    trace.add_argument("--ctstate", default="NEW",
                       choices=("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED"),
                       help="the packet's conntrack state (default NEW)")
    trace.add_argument("--peer", help="the other end: a port id or device of this node, or "
                                      "'node' (default: found by address, else outside)")
    trace.add_argument("--src-mac", help="the sender's MAC (default: its port's)")
    trace.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request: dict[str, Any] = {"command": args.command}
    timeout = args.timeout or DEFAULT_TIMEOUT
    if args.command == "resync" and args.wait:
        deadline = args.timeout or DEFAULT_RESYNC_WAIT
        request.update(wait=True, timeout=deadline)
        timeout = deadline + ANSWER_MARGIN
    elif args.command == "resync":
        request.update(wait=False)
    if args.command == "show":
        request["port"] = args.port
    if args.command == "trace":
        request.update(trace_request(args))
    try:
        reply = call(socket_path(args), request, timeout)
    except (CtlError, cfg.Error) as exc:
        print(f"agent-ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif reply.get("ok"):
        printers = {"status": print_status, "ports": print_ports, "dump": print_dump,
                    "show": lambda r: print_chains(r.get("chains", {})),
                    "diff": lambda r: print(diff.render(r)), "trace": print_trace}
        if args.command in printers:
            printers[args.command](reply)
        else:
            print(f"resync {'done' if args.wait else 'queued'}"
                  + (f": generation {reply.get('generation')}, in sync"
                     if args.wait else ""))
    if not reply.get("ok"):
        print(f"agent-ctl: {reply.get('error', 'the agent reported a failure')}",
              file=sys.stderr)
        return 1
    if args.command == "status" and not reply.get("in_sync"):
        print("agent-ctl: the agent is not in sync with the kernel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

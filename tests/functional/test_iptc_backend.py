"""Functional: the python-iptables backend against a real kernel, in private namespaces.

Every test creates its own `hfwt-<pid>-<rand>-iptc` namespace and deletes it
even on failure. Kernel work runs on a `Writer` thread that entered that
namespace, as the agent's writer thread does; checks read the namespace with
`ip netns exec`. The root namespace is only ever read: an autouse fixture
checks before and after every test that none of our chains is there.

The key property is conformance: what IptcBackend writes, iptables-legacy-save
prints back as exactly the canonical specs (a refresh apply writes nothing),
byte for byte the same tables as iptables-legacy-restore writes.
"""

from __future__ import annotations

import fcntl
import os
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("iptc")

from agent import netns  # noqa: E402
from agent.compiler import NatSettings, Settings, Snapshot, compile_ruleset  # noqa: E402
from agent.dataplane.command import KernelWriteError  # noqa: E402
from agent.dataplane.engine import Engine  # noqa: E402
from agent.dataplane.iptc_backend import IptcBackend  # noqa: E402
from agent.dataplane.plan import BUILTIN_CHAINS, TablePlan, parse_save  # noqa: E402
from agent.dataplane.restore_backend import RestoreBackend, normalise_proto  # noqa: E402
from agent.model import parse_policy  # noqa: E402
from agent.vocab.rule_text import parse_rule_text  # noqa: E402
from agent.vocab.rules import IptablesRule  # noqa: E402
from agent.vocab.ruleset import Hook, Ruleset, Table, merge  # noqa: E402

pytestmark = pytest.mark.kernel

NAMES = Settings().names
NAT = NatSettings(fixed_range="10.0.0.0/16", routing_source_ip="198.51.100.1",
                  public_interface="eth0", dmz_cidr=("192.0.2.0/24",), dhcp_bridges=("br0",))
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}


# ---------------------------------------------------------------- harness

class Writer:
    """A thread inside a namespace running the calls it is given, one at a time."""

    def __init__(self, ns: str) -> None:
        self.jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._main, args=(ns,), name=f"writer-{ns}",
                                       daemon=True)
        self.thread.start()

    def _main(self, ns: str) -> None:
        entered: BaseException | None = None
        try:
            netns.enter(ns)
        except OSError as exc:  # reported to every caller: never run outside the namespace
            entered = exc
        while (job := self.jobs.get()) is not None:
            fn, reply = job
            try:
                if entered:
                    raise entered
                reply.put((True, fn()))
            except BaseException as exc:  # handed back to the test
                reply.put((False, exc))

    def __call__(self, fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
        reply: queue.Queue[Any] = queue.Queue()
        self.jobs.put((lambda: fn(*args), reply))
        ok, value = reply.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)


def sh(*argv: str, ns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def save_lines(ns: str, family: int) -> list[str]:
    """iptables-save of `ns` without its timestamped comment lines."""
    return [line for line in sh(SAVE[family], ns=ns).splitlines() if not line.startswith("#")]


def kernel(ns: str, family: int) -> dict[str, dict[str, list[str]]]:
    """table -> chain -> rule specs, as the engine reads them."""
    text = "\n".join(save_lines(ns, family))
    return {name: t.chains for name, t in parse_save(text, normalise_proto).items()}


def root_hostfw_lines() -> list[str]:
    """Our lines in the root namespace's legacy tables (read only)."""
    return [line for family in (4, 6) for line in sh(SAVE[family]).splitlines()
            if NAMES.chain_prefix in line]


@pytest.fixture(autouse=True)
def root_untouched() -> Iterator[None]:
    assert root_hostfw_lines() == [], "the root namespace holds hostfw rules before the test"
    yield
    assert root_hostfw_lines() == [], "hostfw rules leaked into the root namespace"


def new_namespace() -> str:
    name = f"hfwt-{os.getpid()}-{secrets.token_hex(3)}-iptc"
    sh("ip", "netns", "add", name)
    return name


def delete_namespace(name: str) -> None:
    """Kill what still runs inside (it would pin the namespace), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.fixture
def ns() -> Iterator[str]:
    name = new_namespace()
    try:
        yield name
    finally:
        delete_namespace(name)


@pytest.fixture
def writer(ns: str) -> Iterator[Writer]:
    w = Writer(ns)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def private_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An xtables lock of our own, honoured by us and by iptables (XTABLES_LOCKFILE).

    Keeps these tests from waiting on, or holding up, other iptables users of the host.
    """
    path = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(path))
    return path


# ---------------------------------------------------------------- a representative ruleset

def rule(direction: str, ethertype: str, protocol: str | None = None, low: int | None = None,
         high: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"direction": direction, "ethertype": ethertype, "protocol": protocol,
            "port_range_min": low, "port_range_max": high, **extra}


def policy(ports: int = 20, variant: int = 0) -> dict[str, Any]:
    """Remote groups, address groups, pairs, IPv6, ICMP types, ranges, stateless, NAT."""
    groups = {
        "web": [rule("ingress", "IPv4", "tcp", 80, 80),
                rule("ingress", "IPv4", "tcp", 8000 + variant, 8080),
                rule("ingress", "IPv4", "icmp", 8, 0),
                rule("ingress", "IPv4", "gre", remote_ip_prefix="192.168.0.0/16"),
                rule("ingress", "IPv4", "tcp", 5432, 5432, remote_group_id="db"),
                rule("ingress", "IPv6", "icmp", 128),
                rule("ingress", "IPv6", "udp", 53, 53, source_port_range_min=1000,
                     source_port_range_max=2000),
                rule("ingress", "IPv6", "tcp", remote_address_group_id="admins"),
                rule("egress", "IPv4"), rule("egress", "IPv6")],
        "db": [rule("ingress", "IPv4", "tcp", 5432, 5432, remote_group_id="web"),
               rule("ingress", "IPv6", "ipv6-icmp", 1, 3),
               rule("egress", "IPv4", "udp", 1, 1024, remote_ip_prefix="10.0.0.0/8"),
               rule("egress", "IPv4", "udplite", 7, 7)],
        "cold": [rule("ingress", "IPv4", "udp", 4789, 4789, stateful=False),
                 rule("egress", "IPv4", stateful=False)],
    }
    out = []
    for i in range(ports):
        port: dict[str, Any] = {
            "id": f"port-{i:03d}", "device": f"tap{i:03d}-{variant}0",
            "mac_address": f"fa:16:3e:00:01:{i:02x}",
            "fixed_ips": [f"10.0.1.{i + 10}", f"fd00::{i + 10:x}"],
            "security_groups": [("web", "db", "cold")[i % 3]],
        }
        if i % 4 == 0:
            port["allowed_address_pairs"] = [
                {"ip_address": f"10.0.9.{i}", "mac_address": "fa:16:3e:ff:00:01"},
                {"ip_address": "fd00:9::/64"}]
        if i % 5 == 0:
            port["floating_ips"] = [f"203.0.113.{i + 1}"]
        out.append(port)
    out.append({"id": "no-ip", "device": "tapnoip", "mac_address": "fa:16:3e:00:02:01",
                "security_groups": ["web"]})
    out.append({"id": "no-sec", "device": "tapnosec", "mac_address": "fa:16:3e:00:02:02",
                "fixed_ips": ["10.0.2.2"], "port_security_enabled": False})
    return {"security_groups": groups, "ports": out,
            "sg_member_ips": {"web": {"IPv4": [["10.0.1.10", None]], "IPv6": ["fd00::a"]},
                              "db": {"IPv4": ["10.0.1.11"]}},
            "address_groups": {"admins": ["192.0.2.0/24", "2001:db8::/64"]}}


# Rules the compiler does not write (yet), in iptables-save's canonical form.
HAND_WRITTEN = {
    (4, "nat"): {
        "hostfw-t-pre": (
            "-d 198.51.100.9/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.9:80",
            "! -i br0 -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353"),
        "hostfw-t-post": (
            "-s 10.0.0.0/24 ! -d 10.0.0.0/24 -o eth0 -m conntrack ! --ctstate DNAT "
            "-j SNAT --to-source 198.51.100.2",)},
    (4, "raw"): {
        "hostfw-t-raw": ("-p udp -m udp --dport 4789 -j CT --notrack",
                         "-i tap+ -m comment --comment \"t zone\" -j CT --zone 9")},
    (6, "raw"): {
        "hostfw-t-raw": ("! -s fd00::/64 -p ipv6-icmp -j CT --notrack",)},
    (4, "filter"): {
        "hostfw-t-misc": (
            "-p tcp -m multiport ! --dports 1:10,20 -m multiport --sports 5:6 -j DROP",
            "-m mark ! --mark 0x1/0x1 -j MARK --set-xmark 0x2/0x3",
            "-m physdev ! --physdev-is-bridged -j RETURN",
            "-m set ! --match-set hfw4gweb src,dst -j RETURN",
            "-m comment --comment \"-starts like an option\" -j hostfw-t-misc2",
            "! -p tcp -g hostfw-t-misc2",
        ),
        "hostfw-t-misc2": ("-m mac --mac-source fa:16:3e:00:00:01 -j RETURN",)},
}
HAND_HOOKS = {(4, "nat"): (Hook("PREROUTING", "hostfw-t-pre"),
                          Hook("POSTROUTING", "hostfw-t-post")),
              (4, "raw"): (Hook("PREROUTING", "hostfw-t-raw"),),
              (6, "raw"): (Hook("PREROUTING", "hostfw-t-raw"),)}


def representative(ports: int = 20, variant: int = 0, nat: bool = True,
                   extras: bool = True) -> Ruleset:
    parsed = parse_policy(policy(ports, variant))
    assert parsed.errors == ()
    devices = frozenset(p.device for p in parsed.ports)
    snapshot = Snapshot(parsed, devices, Settings(nat=NAT if nat else None),
                        bridges={d: "br0" for d in devices}, zones={"br0": 7})
    compiled = compile_ruleset(snapshot)
    assert compiled.errors == ()
    if not extras:
        return compiled.ruleset
    hand = {key: Table(key[0], key[1], {name: rules(*texts) for name, texts in chains.items()},
                       HAND_HOOKS.get(key, ()))
            for key, chains in HAND_WRITTEN.items()}
    return merge(compiled.ruleset, Ruleset(hand))


def rules(*texts: str) -> tuple[IptablesRule, ...]:
    """Rules written in iptables-save notation, as the values a Table holds."""
    return tuple(parse_rule_text(text) for text in texts)


def texts(table: Table) -> dict[str, list[str]]:
    return {chain: [rule.text for rule in chain_rules]
            for chain, chain_rules in table.chains.items()}


def new_engine(backend: Any = None) -> Engine:
    return Engine(backend or IptcBackend(), NAMES, (4, 6))


def owned(chains: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: rules for name, rules in chains.items() if NAMES.owns_chain(name)}


# ---------------------------------------------------------------- translation

@pytest.mark.parametrize("spec", [
    "-p tcp -m tcp --dport -j ACCEPT",               # python-iptables would pass NULL: crash
    "-j MARK --set-xmark",                           # ... or index past its argv
    "-p tcp -m tcp --dport 80 81 -j ACCEPT",         # the parser would drop 81 silently
    "-p tcp -m tcp --tcp-flags SYN,ACK -j ACCEPT",   # ... or read its one value twice
    "-m physdev --physdev-is-bridged yes -j ACCEPT",
    "-m tcp --no-such-option 1 -j ACCEPT",
    "-p tcp -j CT --zone 1 --no-such-option",
])
def test_options_take_the_values_the_extension_declares(spec: str, ns: str,
                                                        writer: Writer) -> None:
    backend = writer(IptcBackend)
    with pytest.raises(KernelWriteError, match="hostfw-bad"):
        writer(backend.commit, TablePlan(4, "filter", rewrites={"hostfw-bad": rules(spec)}))
    assert "hostfw-bad" not in kernel(ns, 4).get("filter", {})


# ---------------------------------------------------------------- 1. conformance

def test_kernel_prints_back_exactly_the_canonical_specs(ns: str, writer: Writer) -> None:
    desired = representative()
    engine = writer(new_engine)
    first = writer(engine.apply, desired)
    assert sorted(first.tables_written) == sorted(f"{t}/v{f}" for f, t in desired.tables)
    again = writer(engine.apply, desired, True)
    assert again.tables_written == [], "the kernel text differs from the canonical specs"
    for (family, table), want in desired.tables.items():
        assert owned(kernel(ns, family)[table]) == texts(want)


def test_tables_are_byte_identical_to_iptables_legacy_restore(ns: str, writer: Writer) -> None:
    desired = representative(extras=True)
    writer(new_engine().apply, desired)
    other = new_namespace()
    try:
        restore = Writer(other)
        try:
            restore(new_engine(RestoreBackend("iptables-legacy")).apply, desired)
        finally:
            restore.stop()
        for family in (4, 6):
            assert save_lines(ns, family) == save_lines(other, family)
    finally:
        delete_namespace(other)


def test_commit_never_redirects_stdout(ns: str, writer: Writer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """python-iptables dup2s fd 1 to read parameters back; this backend never lets it."""
    calls: list[tuple[int, int]] = []
    real_dup2 = os.dup2
    monkeypatch.setattr(os, "dup2", lambda a, b, *rest: calls.append((a, b)) or
                        real_dup2(a, b, *rest))
    before = os.fstat(1)
    writer(new_engine().apply, representative(ports=4))
    assert calls == []
    assert os.fstat(1).st_ino == before.st_ino


# ---------------------------------------------------------------- 2. foreign rules

FOREIGN_LOOP = """
for i in $(seq 1 {n}); do
  spec="-s 198.51.100.$((i % 200 + 1))/32 -m comment --comment foreign-$i -j ACCEPT"
  iptables-legacy -w 20 -A FORWARD $spec || exit 1
  if (( i % 3 == 0 )); then iptables-legacy -w 20 -D FORWARD $spec || exit 1; fi
done
"""


def add_foreign(ns: str) -> None:
    for argv in (["-N", "FOREIGN"], ["-A", "FOREIGN", "-s", "192.0.2.1/32", "-j", "DROP"],
                 ["-A", "FORWARD", "-j", "FOREIGN"], ["-A", "INPUT", "-p", "tcp", "--dport",
                                                      "22", "-j", "ACCEPT"],
                 ["-t", "nat", "-A", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE"],
                 ["-t", "raw", "-A", "PREROUTING", "-i", "eth9", "-j", "CT", "--notrack"]):
        sh("iptables-legacy", "-w", "5", *argv, ns=ns)
    sh("ip6tables-legacy", "-w", "5", "-A", "FORWARD", "-s", "2001:db8::1/128", "-j", "DROP",
       ns=ns)


def foreign_part(ns: str) -> dict[int, dict[str, dict[str, list[str]]]]:
    """Every chain and rule that is not ours: foreign chains, and foreign rules in built-ins."""
    out: dict[int, dict[str, dict[str, list[str]]]] = {}
    for family in (4, 6):
        for table, chains in kernel(ns, family).items():
            for chain, rules in chains.items():
                theirs = [r for r in rules if NAMES.chain_prefix not in r]
                if not NAMES.owns_chain(chain) and (theirs or chain not in BUILTIN_CHAINS):
                    out.setdefault(family, {}).setdefault(table, {})[chain] = theirs
    return out


def test_foreign_rules_survive_concurrent_iptables_writers(ns: str, writer: Writer,
                                                          private_lock: Path) -> None:
    add_foreign(ns)
    static = foreign_part(ns)
    rulesets = [representative(ports=12, variant=v) for v in (0, 1)]
    engine = writer(new_engine)
    writer(engine.apply, rulesets[0])
    n = 150
    loop = subprocess.Popen(["ip", "netns", "exec", ns, "bash", "-c", FOREIGN_LOOP.format(n=n)],
                            env={**os.environ, "XTABLES_LOCKFILE": str(private_lock)},
                            stderr=subprocess.PIPE, text=True)
    applies = 0
    try:
        while loop.poll() is None or applies < 10:
            report = writer(engine.apply, rulesets[(applies + 1) % 2], applies % 4 == 3)
            assert report.tables_written, "each apply must write while the loop runs"
            applies += 1
    finally:
        loop.wait(timeout=120)
    assert loop.returncode == 0, loop.stderr.read() if loop.stderr else ""
    assert applies >= 10

    forward = kernel(ns, 4)["filter"]["FORWARD"]
    expected = [f"-s 198.51.100.{i % 200 + 1}/32 -m comment --comment foreign-{i} -j ACCEPT"
                for i in range(1, n + 1) if i % 3]
    assert [r for r in forward if "foreign-" in r] == expected
    after = foreign_part(ns)
    after[4]["filter"]["FORWARD"] = [r for r in after[4]["filter"]["FORWARD"]
                                     if "foreign-" not in r]
    assert after == static
    last = rulesets[applies % 2]
    assert writer(engine.apply, last, True).tables_written == []


# ---------------------------------------------------------------- 3. hooks and stale chains

def test_hooks_once_in_order_and_stale_chains_deleted(ns: str, writer: Writer) -> None:
    sh("iptables-legacy", "-w", "5", "-A", "FORWARD", "-s", "192.0.2.7/32", "-j", "ACCEPT", ns=ns)
    desired = representative(ports=6)
    engine = writer(new_engine)
    writer(engine.apply, desired)
    filter_v4 = desired.tables[(4, "filter")]
    wanted = [h.spec for h in filter_v4.hooks if h.chain == "FORWARD"]
    assert len(wanted) >= 2, "the ruleset should hook FORWARD more than once"
    assert kernel(ns, 4)["filter"]["FORWARD"] == [*wanted, "-s 192.0.2.7/32 -j ACCEPT"]

    # A hook added twice by hand is cut back to one and the order restored
    # (deletes by exact match, inserts at the top).
    sh("iptables-legacy", "-w", "5", "-A", "FORWARD", "-j", "hostfw-FORWARD", ns=ns)
    assert writer(engine.apply, desired, True).hook_changes > 0
    assert writer(engine.apply, desired, True).tables_written == []
    assert kernel(ns, 4)["filter"]["FORWARD"] == [*wanted, "-s 192.0.2.7/32 -j ACCEPT"]

    # Fewer ports, no NAT, no hand-written tables: their chains and hooks go.
    smaller = representative(ports=2, nat=False, extras=False)
    gone = NAMES.port_chain("o", "tap005-00")
    sh("iptables-legacy", "-w", "5", "-N", "FOREIGN-ref", ns=ns)
    sh("iptables-legacy", "-w", "5", "-A", "FOREIGN-ref", "-j", gone, ns=ns)
    writer(engine.apply, smaller, True)  # refresh: the engine must see the foreign reference
    assert writer(engine.apply, smaller, True).tables_written == []
    for family in (4, 6):
        tables = kernel(ns, family)
        assert "hostfw-t-raw" not in tables.get("raw", {})
        for (fam, table), want in smaller.tables.items():
            if fam != family:
                continue
            have = owned(tables[table])
            if family == 4 and table == "filter":  # still referenced by a foreign chain:
                assert have.pop(gone) == []        # flushed, not deleted
            assert have == texts(want)
        assert not owned(tables.get("nat", {}))
        hooks = [r for c, rules in tables.get("nat", {}).items() for r in rules
                 if NAMES.chain_prefix in r]
        assert hooks == []
    assert "-s 192.0.2.7/32 -j ACCEPT" in kernel(ns, 4)["filter"]["FORWARD"]


# ---------------------------------------------------------------- 4. failures change nothing

FAILING_PLANS = {
    "missing ipset": (
        TablePlan(4, "filter", rewrites={"hostfw-new": rules("-j RETURN",
                                                        "-m set --match-set hfw-nope src -j DROP")},
                  hook_inserts=[Hook("INPUT", "hostfw-new")]),
        "hfw-nope"),
    "missing chain": (
        TablePlan(4, "filter", rewrites={"hostfw-new": rules("-j RETURN"),
                                         "hostfw-accept": ("-j hostfw-missing",)},
                  flushes=["hostfw-sg-fallback"]),
        "hostfw-missing"),
    "refused by the kernel": (
        TablePlan(4, "filter", rewrites={"hostfw-new": rules("-j DNAT --to-destination 10.0.0.1")},
                  hook_inserts=[Hook("FORWARD", "hostfw-new")]),
        "hostfw-new"),
    "chain still referenced": (
        TablePlan(4, "filter", rewrites={"hostfw-new": rules("-j RETURN")},
                  flushes=["hostfw-sg-fallback"], deletes=["hostfw-sg-fallback"]),
        "hostfw-sg-fallback"),
    "hook not there": (
        TablePlan(6, "filter", rewrites={"hostfw-new": rules("-j RETURN")},
                  hook_deletes=[("INPUT", "-j hostfw-new")]),
        "-j hostfw-new"),
}


@pytest.mark.parametrize("case", sorted(FAILING_PLANS))
def test_failing_plan_raises_and_leaves_the_table_as_it_was(case: str, ns: str,
                                                           writer: Writer) -> None:
    desired = representative(ports=3, nat=False, extras=False)
    writer(new_engine().apply, desired)
    before = {f: save_lines(ns, f) for f in (4, 6)}
    backend = writer(IptcBackend)
    plan, named = FAILING_PLANS[case]
    with pytest.raises(KernelWriteError) as failure:
        writer(backend.commit, plan)
    assert named in str(failure.value)
    assert {f: save_lines(ns, f) for f in (4, 6)} == before
    # The same backend still commits a good plan afterwards.
    writer(backend.commit, TablePlan(4, "filter", rewrites={"hostfw-new": rules("-j RETURN")}))
    assert kernel(ns, 4)["filter"]["hostfw-new"] == ["-j RETURN"]


# ---------------------------------------------------------------- 5. namespaces and the lock

def test_each_commit_lands_in_the_calling_threads_namespace(ns: str, writer: Writer) -> None:
    """python-iptables' tables are process-wide singletons; the namespace must still follow."""
    other = new_namespace()
    second = Writer(other)
    try:
        root = os.stat("/proc/thread-self/ns/net").st_ino
        assert writer(netns.current_inode) not in (root, second(netns.current_inode))
        backend = writer(IptcBackend)  # one backend, shared by both namespaces' writers
        for i in range(3):
            for w, tag in ((writer, "one"), (second, "two")):
                w(backend.commit, TablePlan(4, "filter", rewrites={
                    f"hostfw-{tag}{i}": (f"-m comment --comment {tag} -j RETURN",)}))
        assert sorted(owned(kernel(ns, 4)["filter"])) == ["hostfw-one0", "hostfw-one1",
                                                           "hostfw-one2"]
        assert sorted(owned(kernel(other, 4)["filter"])) == ["hostfw-two0", "hostfw-two1",
                                                              "hostfw-two2"]
    finally:
        second.stop()
        delete_namespace(other)


def test_commit_waits_for_the_xtables_lock_then_gives_up(ns: str, writer: Writer,
                                                        private_lock: Path) -> None:
    plan = TablePlan(4, "filter", rewrites={"hostfw-locked": rules("-j RETURN")})
    backend = writer(lambda: IptcBackend(lock_timeout=0.5))
    fd = os.open(private_lock, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # iptables honours the same lock file, so it is the one other writers take.
        busy = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy", "-w", "1", "-S"],
                              capture_output=True, text=True)
        assert busy.returncode != 0 and "xtables lock" in busy.stderr
        start = time.monotonic()
        with pytest.raises(KernelWriteError, match="busy"):
            writer(backend.commit, plan)
        assert 0.4 < time.monotonic() - start < 3
        assert "hostfw-locked" not in kernel(ns, 4).get("filter", {})
    finally:
        os.close(fd)
    writer(backend.commit, plan)
    assert kernel(ns, 4)["filter"]["hostfw-locked"] == ["-j RETURN"]

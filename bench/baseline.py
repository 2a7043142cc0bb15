"""Before and after in one run: a baseline git revision measured beside the working tree.

Rules of this room:

1. The baseline is the revision's `agent/` package, extracted with
   `git archive` into a temporary directory (no worktree: a killed run leaves
   nothing in the repository) and deleted on the way out, also on errors.
   Without git metadata (a tarball) or with an unknown revision the section
   records why it was skipped and measures nothing.
2. Both trees run the same way: subprocesses of this venv's interpreter with
   PYTHONPATH naming the tree (the working tree too, so both pay the same
   process start and imports), their bytecode compiled beforehand.
3. Samples interleave, head then base, repeat after repeat, per backend, so
   a busy minute on this shared machine hits both; the figures are medians
   and the head/base ratio of the medians.
4. Three figures, at the peer workload (bench/workloads.py):
   - rules: `-A` lines of the save tools after the cold apply, both
     families, every table (the namespace is private: all of it is ours);
   - cold apply: parse + compile + apply in process into a fresh namespace
     holding the workload's taps on a bridge (bench/baseline_driver.py, the
     same as engine_bench.py's cold sample);
   - e2e cold start: the real `hostfw-agent` started with the taps present,
     to in sync and to enforced (bench/e2e.py's `cold_sample`).
5. The agent's config file keeps only the options the tree under test knows
   (the harness may write options added since the baseline); what was
   stripped is recorded.
"""

from __future__ import annotations

import compileall
import configparser
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import e2e, workloads
from bench import e2e_net as net
from bench.agent_bench import BenchAgent
from bench.sandbox import add_taps, private_netns
from bench.stats import median, summary
from tests.support.topology import run_in

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("baseline_driver.py")
DEFAULT_REV = "4e890fc"   # the layout before issue 13's work
SAVE_TOOLS = {"iptables-legacy": ("iptables-legacy-save", "ip6tables-legacy-save"),
              "iptables-nft": ("iptables-nft-save", "ip6tables-nft-save")}
FIGURES = ("rules", "cold_apply_s", "e2e_in_sync_s", "e2e_enforced_s")


@dataclass(frozen=True)
class Tree:
    """An `agent` package to run: `path` goes on PYTHONPATH."""

    label: str                   # "head" or "base"
    path: Path
    rev: str
    known_options: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.path)}


# ---------------------------------------------------------------- the trees

def git_reason(root: Path, rev: str) -> str | None:
    """Why `rev` cannot be materialised from `root`; None when it can."""
    if shutil.which("git") is None:
        return "git is not installed"
    probe = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-dir"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"{root} has no git metadata (a tarball?): no baseline to check out"
    probe = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet",
                            f"{rev}^{{commit}}"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"revision {rev!r} is not in {root}'s repository"
    return None


def resolve(root: Path, rev: str) -> str:
    """The full commit id of `rev` (`HEAD` for the working tree's base)."""
    return subprocess.run(["git", "-C", str(root), "rev-parse", rev], capture_output=True,
                          text=True, check=True).stdout.strip()


@contextmanager
def materialise(root: Path, rev: str) -> Iterator[Path]:
    """`rev`'s `agent/` package in a temporary directory, deleted on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="hostfw-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", rev,
                                  "agent"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def known_options(path: Path) -> dict[str, frozenset[str]]:
    """The tree's config options, group -> names, from its `agent.config.list_opts`."""
    code = ("import json; from agent.config import list_opts; "
            "print(json.dumps({g: [o.dest for o in opts] for g, opts in list_opts()}))")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(path)}, cwd="/")
    return {group: frozenset(names) for group, names in json.loads(proc.stdout).items()}


def prepare(label: str, path: Path, rev: str) -> Tree:
    """Compile the tree's bytecode (a first start must not pay for it) and read its options."""
    compileall.compile_dir(str(path / "agent"), quiet=1)
    return Tree(label, path, rev, known_options(path))


def strip_unknown(conf_text: str, known: Mapping[str, frozenset[str]]
                  ) -> tuple[str, list[str]]:
    """`conf_text` without the options `known` lacks; (text, "[group] name" stripped).

    Groups `known` does not list at all are left alone (another library's).
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(conf_text)
    stripped = []
    for group in parser.sections():
        if group not in known:
            continue
        for name in list(parser[group]):
            if name not in known[group]:
                parser.remove_option(group, name)
                stripped.append(f"[{group}] {name}")
    out = io.StringIO()
    parser.write(out)
    return out.getvalue(), stripped


# ---------------------------------------------------------------- rules in the kernel

def count_rules(save_text: str) -> dict[str, int]:
    """`-A` lines of one save tool's output, by table."""
    out: dict[str, int] = {}
    table = "?"
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            out.setdefault(table, 0)
        elif line.startswith("-A "):
            out[table] = out.get(table, 0) + 1
    return out


def kernel_rules(ns: str, backend: str) -> dict[str, Any]:
    """Rules in `ns` for `backend`'s tools: total, and per family and table."""
    by: dict[str, dict[str, int]] = {}
    for family, tool in zip(("ipv4", "ipv6"), SAVE_TOOLS[backend], strict=True):
        by[family] = count_rules(run_in(ns, [tool]).stdout)
    return {"total": sum(sum(t.values()) for t in by.values()), **by}


# ---------------------------------------------------------------- cold apply, in process

def cold_apply(tree: Tree, backend: str, policy_path: Path, devices: list[str]
               ) -> dict[str, Any]:
    """One driver run in a fresh namespace holding `devices` as taps on br0."""
    with private_netns(f"b{tree.label}") as ns:
        run_in(ns, ["ip", "link", "add", "br0", "type", "bridge"])
        run_in(ns, ["ip", "link", "set", "br0", "up"])
        add_taps(ns, devices, "br0")
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-P", str(DRIVER),
                               str(policy_path), backend], capture_output=True, text=True,
                              env=tree.env(), cwd="/", timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{tree.label} driver exited {proc.returncode}: "
                               f"{proc.stderr[-1500:]}")
        sample = json.loads(proc.stdout.strip().splitlines()[-1])
        if not sample["agent_module"].startswith(str(tree.path)):
            raise RuntimeError(f"{tree.label} ran {sample['agent_module']}, not {tree.path}")
        sample["kernel_rules"] = kernel_rules(ns, backend)
    time.sleep(0.5)   # the namespace's taps go away in the background
    return sample


# ---------------------------------------------------------------- e2e cold start

class TreeAgent(BenchAgent):
    """The real agent run from `tree` (PYTHONPATH), its config cut to the tree's options."""

    def __init__(self, workdir: Path, netns: str, policy: dict[str, Any], tree: Tree,
                 **kwargs: Any) -> None:
        super().__init__(workdir, netns, policy, **kwargs)
        self.tree = tree
        text, self.stripped = strip_unknown(self.conf_path.read_text(), tree.known_options)
        self.conf_path.write_text(text)

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> TreeAgent:
        super().start(wait, {**(env or {}), "PYTHONPATH": str(self.tree.path)})
        return self


class TreeDriver(e2e.StandaloneDriver):
    """bench/e2e.py's standalone driver, starting `tree`'s agent."""

    def __init__(self, workdir: Path, ns: str, backend: str, tree: Tree) -> None:
        super().__init__(workdir, ns, backend, "write")
        self.tree = tree
        self.stripped: list[str] = []

    def new_agent(self, workdir: Path, doc: dict[str, Any]) -> TreeAgent:
        agent = TreeAgent(workdir, self.ns, doc, self.tree, backend=self.backend,
                          resync_interval=3600)
        self.stripped = agent.stripped
        return agent


# ---------------------------------------------------------------- one backend

def compare(head: list[float], base: list[float]) -> dict[str, Any]:
    """Both trees' summaries and the head/base ratio of their medians."""
    out: dict[str, Any] = {"head": summary(head), "base": summary(base), "ratio": None}
    h, b = median(out["head"]), median(out["base"])
    if h is not None and b:
        out["ratio"] = round(h / b, 3)
    return out


def figures(samples: Mapping[str, Mapping[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """The compared figures of one backend from its raw samples (tree -> kind -> list)."""
    def values(tree: str, kind: str, key: Callable[[dict[str, Any]], float | None]
               ) -> list[float]:
        got = [key(s) for s in samples.get(tree, {}).get(kind, []) if "error" not in s]
        return [v for v in got if v is not None]

    keys: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {
        "rules": ("cold", lambda s: s["kernel_rules"]["total"]),
        "cold_apply_s": ("cold", lambda s: s["total_s"]),
        "e2e_in_sync_s": ("e2e", lambda s: s["in_sync_seen_s"]),
        "e2e_enforced_s": ("e2e", lambda s: s.get("enforced_s")),
    }
    return {name: compare(values("head", kind, key), values("base", kind, key))
            for name, (kind, key) in keys.items()}


def bench_backend(trees: list[Tree], backend: str, workload: dict[str, Any], repeats: int,
                  work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """`repeats` rounds of (cold apply, e2e cold start), each tree in turn within a round."""
    devices = [p["device"] for p in workload["ports"]]
    policy_path = work / "policy.json"
    policy_path.write_text(json.dumps(workloads.policy_doc(workload)))
    size = len(devices)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.label: {"cold": [], "e2e": []} for t in trees}
    with ExitStack() as stack:
        node = net.build_node(devices, 1)
        stack.callback(node.close)
        net.static_neighbours(node, 0)
        scen = e2e.Scenario(workload, node.vms)
        drivers = {t.label: TreeDriver(work / f"e2e-{t.label}", node.ns, backend, t)
                   for t in trees}
        for driver in drivers.values():
            stack.callback(driver.close)
        for rep in range(repeats):
            for tree in trees:
                say(f"baseline {backend} {size} ports, round {rep + 1}: {tree.label} cold apply")
                samples[tree.label]["cold"].append(_guard(lambda t=tree: cold_apply(
                    t, backend, policy_path, devices)))
            for tree in trees:
                say(f"baseline {backend} {size} ports, round {rep + 1}: {tree.label} e2e cold")
                driver = drivers[tree.label]
                samples[tree.label]["e2e"].append(_guard(lambda d=driver: e2e.cold_sample(
                    node, d, scen.doc(), size + 4, 60 + size * 0.3)))
                driver.stop()
    out: dict[str, Any] = {"ports": size, "repeats": repeats, **figures(samples),
                           "config_stripped": {t: d.stripped for t, d in drivers.items()},
                           "samples": samples}
    for name in FIGURES:
        fig = out[name]
        say(f"  {name}: head {median(fig['head'])}, base {median(fig['base'])}, "
            f"ratio {fig['ratio']}")
    return out


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One sample; a failure is recorded in its place and the series goes on."""
    try:
        return fn()
    except Exception as exc:  # one failed sample must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def bench_baseline(rev: str, backends: list[str], ports: int, repeats: int, work: Path,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """The "baseline" section of latest.json: `rev` against the working tree."""
    out: dict[str, Any] = {"rev": rev, "head_rev": None, "ports": ports, "repeats": repeats,
                           "order": "head, base; per round", "backends": {}}
    reason = git_reason(ROOT, rev)
    if reason:
        say(f"baseline: skipped ({reason})")
        out["skipped"] = reason
        return out
    out["rev_full"] = resolve(ROOT, rev)
    out["head_rev"] = resolve(ROOT, "HEAD")
    workload = workloads.load(ports, work / "workloads")
    with materialise(ROOT, rev) as base_path:
        trees = [prepare("head", ROOT, "working tree"), prepare("base", base_path, rev)]
        for backend in backends:
            bwork = work / f"baseline-{backend}"
            bwork.mkdir(parents=True, exist_ok=True)
            try:
                out["backends"][backend] = bench_backend(trees, backend, workload, repeats,
                                                         bwork, say)
            except Exception as exc:  # the other backend still runs
                say(f"baseline {backend}: FAILED: {exc}")
                out["backends"][backend] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return out

"""The metrics the docs name are the metrics the agent serves, on one documented port.

Names are compared with what an Observer really exposes (the Prometheus text
format, where counters end in `_total`), so a renamed or misspelt metric in
README.md or doc/*.md fails here, and so does a metric nobody documented.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import config
from agent.metrics import Observer

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "doc").glob("*.md"))]
OPERATIONS = ROOT / "doc/operations.md"
METRICS_PORT = 9741  # hostfw's port for [metrics] listen, in every example
NEUTRON_PORTS = (9696, 9697)  # neutron-server's API and the metadata proxy: never ours


def served() -> set[str]:
    """The hostfw_* names an RPC-mode agent's /metrics shows: the `# TYPE` names (a
    counter's with `_total`, a histogram's base name) and every sample's."""
    observer = Observer(30.0, lambda: {"connected": True, "rpc_errors": 0, "error": None})
    text = generate_latest(observer.registry).decode()
    names = set(re.findall(r"^# TYPE (\w+)", text, re.MULTILINE))
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
    return {name for name in names if name.startswith("hostfw_")}


def test_every_documented_metric_is_served() -> None:
    names = served()
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for name in re.findall(r"\bhostfw_[a-z0-9_]+", line):
                assert name in names, f"{doc.relative_to(ROOT)}:{lineno}: {name} is not served"


def test_every_served_metric_is_in_the_operations_table() -> None:
    table = OPERATIONS.read_text()
    documented = set(re.findall(r"`(hostfw_[a-z0-9_]+)`", table))
    counters = {name.removesuffix("_total") for name in documented}
    families = {name for name in served()
                if not re.search(r"_(bucket|count|sum)$", name)
                and not (name.endswith("_total") and name.removesuffix("_total") in counters)}
    missing = sorted(name for name in families
                     if name not in documented and f"{name}_total" not in documented)
    assert not missing, f"doc/operations.md does not list {missing}"


def test_one_metrics_port_is_documented() -> None:
    texts = {doc.relative_to(ROOT): doc.read_text() for doc in DOCS}
    sample = ROOT / "etc/hostfw/agent.conf.sample"
    texts[sample.relative_to(ROOT)] = sample.read_text()
    help_text = " ".join(opt.help for opt in config.METRICS_OPTS)
    texts[Path("agent/config.py [metrics]")] = help_text
    examples = []
    for where, text in texts.items():
        for port in NEUTRON_PORTS:
            assert not re.search(rf":{port}\b", text), f"{where} listens on port {port}"
        # `listen = HOST:PORT` and the HOST:PORT examples around /metrics
        for line in text.splitlines():
            if re.search(r"metrics|listen", line):
                examples += [(where, int(port)) for port in
                             re.findall(r"(?:\d+\.\d+\.\d+\.\d+|\]):(\d+)\b", line)]
    assert examples, "no metrics address example found"
    assert {port for _, port in examples} == {METRICS_PORT}, examples
    assert str(METRICS_PORT) in help_text  # the sample shows the port too

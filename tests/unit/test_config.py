"""agent/config.py: values are checked by their oslo.config types, and `validate`
turns every bad one into a line naming its option instead of raising.

The values come from a real config file, as an operator writes them: oslo.config
checks a file's value only when it is read, which is where the tracebacks came
from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from oslo_config import cfg

from agent import config


def load(tmp_path: Path, text: str) -> cfg.ConfigOpts:
    path = tmp_path / "agent.conf"
    path.write_text(text)
    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    config.set_log_defaults(conf)
    conf(["--config-file", str(path)], project="hostfw", default_config_files=[])
    return conf


def test_defaults_are_valid(tmp_path: Path) -> None:
    assert config.validate(load(tmp_path, "")) == []


def test_a_bad_boolean_with_nat_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    conf = load(tmp_path, "[firewall]\nconntrack_zones = maybe\n[nat]\nfixed_range = 10.0.0.0/24\n")
    assert config.validate(conf) == [
        "[firewall] conntrack_zones: Unexpected boolean value 'maybe'"]


def test_every_bad_value_is_named_with_its_option(tmp_path: Path) -> None:
    conf = load(tmp_path, "\n".join([
        "[DEFAULT]", "use_stderr = sometimes",                       # oslo.log's, too
        "[agent]", "device_prefix = tap-", "netns = ..", "resync_interval = 0",
        "[firewall]", "chain_prefix = hostfw_too_long", "ipset_prefix = 9x",
        "accept_mark = 0x3",
        "[metrics]", "listen = localhost",
        "[nat]", "fixed_range = 10.0.0.0/33", "dmz_cidr = 192.0.2.0/24, x",
        "routing_source_ip = 1.2.3", "metadata_host = ::1", "metadata_port = 0",
        "public_interface = eth0 -j ACCEPT", "dhcp_bridges = br0, br 1", ""]))
    problems = config.validate(conf)
    assert [p.split(":")[0] for p in problems] == [
        "[DEFAULT] use_stderr",
        "[agent] device_prefix", "[agent] resync_interval", "[agent] netns",
        "[firewall] chain_prefix", "[firewall] ipset_prefix", "[firewall] accept_mark",
        "[metrics] listen",
        "[nat] fixed_range", "[nat] routing_source_ip", "[nat] public_interface",
        "[nat] dmz_cidr", "[nat] metadata_host", "[nat] metadata_port",
        "[nat] dhcp_bridges",
    ], problems
    assert "[firewall] chain_prefix: Value 'hostfw_too_long' exceeds maximum length 12" \
        in problems
    assert "[nat] metadata_host: ::1 is not an IPv4 address" in problems


@pytest.mark.parametrize("mark, ok", [
    ("0x1", True), ("0x1000000", True), ("0x80000000", True), ("0x00000400", True),
    ("0x3", False), ("0x100000000", False), ("0x0", False), ("1", False),
    ("0x1 -j ACCEPT", False)])
def test_accept_mark_is_one_bit_of_32(tmp_path: Path, mark: str, ok: bool) -> None:
    assert (config.validate(load(tmp_path, f"[firewall]\naccept_mark = {mark}\n")) == []) == ok


@pytest.mark.parametrize("network, ok", [
    ("10.0.0.0/24", True), ("10.0.0.5/8", True), ("192.0.2.1/32", True),
    ("0.0.0.0/0", False), ("10.0.0.0/33", False), ("256.0.0.0/8", False),
    ("10.0.0.0", False), ("2001:db8::/64", False)])
def test_nat_networks_are_ipv4_cidrs_never_the_whole_world(tmp_path: Path, network: str,
                                                           ok: bool) -> None:
    conf = load(tmp_path, f"[firewall]\nconntrack_zones = false\n[nat]\ndmz_cidr = {network}\n")
    assert (config.validate(conf) == []) == ok


@pytest.mark.parametrize("listen", ["", "127.0.0.1:9741", "[::1]:9741", ":9741",
                                    "node1.example:9741"])
def test_metrics_listen_shapes(tmp_path: Path, listen: str) -> None:
    assert config.validate(load(tmp_path, f"[metrics]\nlisten = {listen}\n")) == []


def test_set_override_rejects_a_bad_value_at_once() -> None:
    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf([])
    with pytest.raises(ValueError):
        conf.set_override("public_interface", "eth0 -j ACCEPT", "nat")
    conf.set_override("routing_source_ip", "203.0.113.1", "nat")
    assert conf.nat.routing_source_ip == "203.0.113.1"
    assert config.validate(conf) == []

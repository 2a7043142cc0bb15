"""report_state heartbeats: Neutron's message shape, and the reporter over a real broker.

Why: `openstack network agent list` shows an agent only from its heartbeats
on q-reports-plugin, in the shape neutron.agent.rpc.PluginReportStateAPI
sends and neutron.db.agents_db.AgentExtRpcCallback reads (tests/compat runs
Neutron's own handler on these). Here: the payload, and the reporter against
hostfw-controller's endpoint on the private broker.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import oslo_messaging as messaging
import pytest
from oslo_messaging.rpc.dispatcher import ExpectedException

from agent.controller.endpoint import AgentReports
from agent.sources import rpc_api
from agent.sources.report_state import (
    StateReporter,
    agent_state,
    configurations_of,
    report_kwargs,
)
from tests.rpc.broker import Broker
from tests.rpc.stack import notifier_transport, wait_for

NOW = datetime.datetime(2026, 12, 3, 16, 0, 1, 250000, tzinfo=datetime.UTC)


def test_the_message_has_neutrons_shape() -> None:
    state = agent_state("compute-1", {"backend": "iptc", "ports": 3, "in_sync": True},
                        start_flag=True)
    kwargs = report_kwargs(state, NOW)
    assert set(kwargs) == {"agent_state", "time"}
    inner = kwargs["agent_state"]["agent_state"]   # Neutron nests it once more
    assert {k: inner[k] for k in ("binary", "host", "topic", "agent_type", "start_flag")} == {
        "binary": "hostfw-agent", "host": "compute-1", "topic": "N/A",
        "agent_type": "hostfw agent", "start_flag": True}
    assert inner["configurations"] == {"backend": "iptc", "ports": 3, "in_sync": True}
    uuid.UUID(inner["uuid"])
    # neutron parses it with oslo_utils.timeutils.parse_strtime's default format.
    assert datetime.datetime.strptime(kwargs["time"], "%Y-%m-%dT%H:%M:%S.%f") == \
        NOW.replace(tzinfo=None)
    assert "start_flag" not in agent_state("compute-1", {}, start_flag=False)


def test_configurations_come_from_the_status_document() -> None:
    status = {"mode": "rpc", "backend": "iptables-nft", "in_sync": False, "generation": 7,
              "ports_active": 12, "devices": 13, "errors": ["x"]}
    assert configurations_of(status) == {"backend": "iptables-nft", "mode": "rpc",
                                         "ports": 12, "devices": 13, "in_sync": False,
                                         "generation": 7}


def test_the_controller_refuses_a_report_without_an_agent_state() -> None:
    with pytest.raises(ExpectedException):
        AgentReports().report_state({}, agent_state={"host": "x"}, time="")


class Revived(AgentReports):
    """A server that had declared the agent dead answers "revived" once."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[dict[str, Any]] = []

    def report_state(self, context: Any, **kwargs: Any) -> str:
        self.reports.append(kwargs["agent_state"]["agent_state"])
        answer = super().report_state(context, **kwargs)
        return "revived" if len(self.reports) == 2 else answer


@pytest.fixture
def reports(broker: Broker) -> Iterator[tuple[messaging.Transport, Revived]]:
    transport = notifier_transport(broker.url)
    endpoint = Revived()
    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc_api.REPORTS_TOPIC,
                                    server=f"controller-{uuid.uuid4().hex[:6]}"),
        [endpoint])
    server.start()
    try:
        yield transport, endpoint
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def test_reports_flow_start_flag_once_and_revived_asks_for_a_resync(reports) -> None:
    transport, endpoint = reports
    resyncs = []
    ports = iter(range(100))
    reporter = StateReporter(transport, "compute-1", 5.0,
                             lambda: {"backend": "iptc", "ports": next(ports)},
                             on_revived=lambda: resyncs.append(1))
    assert reporter.report_once() == "new"
    assert reporter.report_once() == "revived" and resyncs == [1]
    assert reporter.report_once() == "alive" and resyncs == [1]
    assert [r.get("start_flag") for r in endpoint.reports] == [True, None, None]
    assert [r["configurations"]["ports"] for r in endpoint.reports] == [0, 1, 2]
    assert reporter.status()["reports"] == 3 and reporter.status()["failures"] == 0


def test_a_failing_configurations_callable_costs_them_not_the_heartbeat(reports) -> None:
    transport, endpoint = reports

    def broken() -> dict[str, Any]:
        raise RuntimeError("state lock poisoned")

    assert StateReporter(transport, "compute-2", 5.0, broken).report_once() == "new"
    assert endpoint.reports[-1]["configurations"] == {}


def test_the_thread_reports_until_stopped(reports) -> None:
    transport, endpoint = reports
    reporter = StateReporter(transport, "compute-3", 0.05, dict)
    reporter.start()
    try:
        wait_for(lambda: reporter.status()["reports"] >= 3, 15, "three reports")
    finally:
        reporter.stop()
    assert not any(t.name == "report-state" and t.is_alive() for t in threading.enumerate())
    assert {r["host"] for r in endpoint.reports} == {"compute-3"}


def test_interval_zero_starts_no_thread(broker: Broker) -> None:
    transport = notifier_transport(broker.url)
    reporter = StateReporter(transport, "compute-4", 0, dict)
    reporter.start()
    assert not any(t.name == "report-state" for t in threading.enumerate())
    reporter.stop()
    transport.cleanup()


def test_without_a_server_a_report_fails_and_is_counted(broker: Broker) -> None:
    transport = notifier_transport(broker.url)
    reporter = StateReporter(transport, "compute-5", 1.0, dict)
    # Aimed at an exchange nobody serves, so the report cannot linger in a
    # queue and reach another test's server: the call times out.
    reporter._client = messaging.get_rpc_client(
        transport, messaging.Target(topic=rpc_api.REPORTS_TOPIC, exchange="hfwt-nobody",
                                    version=rpc_api.REPORT_STATE_VERSION))
    assert reporter.report_once() is None
    transport.cleanup()
    status = reporter.status()
    assert status["failures"] == 1 and status["reports"] == 0 and status["last_error"]

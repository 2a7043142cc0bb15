"""RPC mode: ports and security groups come from a controller over oslo.messaging.

The controller is `hostfw-controller` or a Neutron server; both speak the
API in `agent.sources.rpc_api` (CONTRACT 5).

Rules of this room:

1. Our own threads do all RPC: "rpc-listen" starts the oslo.messaging
   servers (`server.start()` blocks while the broker is down) and "rpc-pull"
   makes every call (a call can block far beyond its timeout while the
   broker is down). Both are made by `start`, in the agent's own network
   namespace, where the broker is reachable. The daemon's threads only flip
   flags under `_cond`: `set_devices` and `status` never wait, `resync` waits
   a bounded time and not at all while the controller is known unreachable.
2. Notifications only mark the source dirty, and only when they concern a
   local port or a group that local ports use (during a pull every one
   counts: the index it would be checked against is about to change). The
   puller gathers them for `[rpc] batch_window`, then pulls once; it delivers
   only a policy that differs from the last one (or one that `resync` asked
   for). A flood of casts costs a few pulls and fewer applies.
3. Every pull asks for all local devices, in chunks of `[rpc] chunk_size`.
   Pulling only the dirty part would need the device -> group -> member
   bookkeeping of Neutron's agent and its merge races (replies and
   notifications crossing, LP#1887405); a pull of every local port is a few
   small calls, the batch window bounds how often it happens, and its result
   is complete and consistent with itself.
4. Nothing is delivered half-way: only when every chunk got a well-formed
   reply. A failed pull leaves the policy in force and is retried with
   tenacity (exponential backoff with jitter, logged); a malformed reply is
   logged and dropped, and waits for the next notification or resync.
5. Broker faults: fanout casts sent while our consumers are disconnected are
   lost, so every reconnect schedules a full pull. oslo.messaging reconnects
   inside its rabbit driver and has no callback for it; `DriverWatch` reads
   the driver's own log records instead. Should their wording change, only
   this early warning is lost: failed pulls and the periodic resync still
   catch up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import oslo_messaging as messaging
import tenacity
from oslo_config import cfg

from agent.model import Invalid, Policy
from agent.sources import rpc_api
from agent.sources.base import Deliver, PolicySource
from agent.sources.rpc_messages import (
    MalformedReply,
    Notice,
    parse_notice,
    policy_from_replies,
    referenced_remotes,
)

LOG = logging.getLogger(__name__)
STOP_TIMEOUT = 3.0   # seconds `stop` gives the servers and the transport to close


def describe(exc: Exception) -> str:
    """One line for logs and status; a RemoteError's text carries the whole remote traceback."""
    if isinstance(exc, messaging.RemoteError):
        return f"the controller failed: {exc.exc_type}: {exc.value}"
    if isinstance(exc, messaging.MessageUndeliverable):
        return f"no controller consumes {rpc_api.PLUGIN_TOPIC} (the request was not routed)"
    return f"{type(exc).__name__}: {exc}"


class PullFailed(RuntimeError):
    """A pull did not complete (broker, controller or transport trouble); retried."""


class DriverWatch(logging.Handler):
    """Connection trouble and recovery, as oslo.messaging's rabbit driver logs them.

    Any ERROR record of the driver is trouble (unreachable, closed, failed to
    publish or consume, blocked); "Reconnected to AMQP server" and "unblocked"
    mean a connection is back. Records are only observed, never changed.
    """

    LOGGER = "oslo.messaging._drivers.impl_rabbit"   # oslo.log turns oslo_ into oslo.
    RECOVERY = ("Reconnected to AMQP server", "has unblocked the connection")

    def __init__(self, on_trouble: Callable[[str], None],
                 on_recovery: Callable[[], None]) -> None:
        super().__init__(level=logging.INFO)
        self._on_trouble = on_trouble
        self._on_recovery = on_recovery

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self._on_trouble(record.getMessage())
        elif any(text in str(record.msg) for text in self.RECOVERY):
            self._on_recovery()

    def attach(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self)
        if not logger.isEnabledFor(logging.INFO):  # the recovery record is INFO
            logger.setLevel(logging.INFO)

    def detach(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


@dataclass(frozen=True)
class _Index:
    """What the last delivered policy says is local: decides which notices matter."""

    port_ids: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    remotes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, policy: Policy) -> _Index:
        groups = frozenset(g for p in policy.ports for g in p.security_groups)
        rules = [policy.groups.get(g, ()) for g in groups]
        remotes = (referenced_remotes(rules, policy.ports)
                   | referenced_remotes(rules, policy.ports, address_groups=True))
        return cls(frozenset(p.id for p in policy.ports), groups, frozenset(remotes))

    def concerns(self, notice: Notice, devices: frozenset[str]) -> bool:
        if notice.method == rpc_api.RULE_UPDATED:
            return bool(notice.groups & self.groups)
        if notice.method == rpc_api.MEMBER_UPDATED:
            return bool(notice.groups & self.remotes)
        if notice.method == rpc_api.PORT_UPDATE:
            return notice.port_id in self.port_ids or notice.device in devices
        return notice.port_id in self.port_ids   # port_delete


class _Notifications:
    """RPC endpoint base: hands every cast to the source, in an executor thread."""

    def __init__(self, on_notice: Callable[[str, dict[str, Any]], None]) -> None:
        self._on_notice = on_notice


class SecurityGroupNotifications(_Notifications):
    """`q-agent-notifier-security_group-update` (SecurityGroupAgentRpcCallbackMixin)."""

    target = messaging.Target(version=rpc_api.SG_NOTIFY_VERSION)

    def security_groups_rule_updated(self, context: Any, **kwargs: Any) -> None:
        self._on_notice(rpc_api.RULE_UPDATED, kwargs)

    def security_groups_member_updated(self, context: Any, **kwargs: Any) -> None:
        self._on_notice(rpc_api.MEMBER_UPDATED, kwargs)


class PortNotifications(_Notifications):
    """`q-agent-notifier-port-update` and `-port-delete` (ML2's AgentNotifierApi)."""

    target = messaging.Target(version=rpc_api.PORT_API_VERSION)

    def port_update(self, context: Any, **kwargs: Any) -> None:
        self._on_notice(rpc_api.PORT_UPDATE, kwargs)

    def port_delete(self, context: Any, **kwargs: Any) -> None:
        self._on_notice(rpc_api.PORT_DELETE, kwargs)


class RpcSource(PolicySource):
    """Pulls security_group_info_for_devices for the local devices; listens for casts."""

    name = "rpc"

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.host: str = conf.host
        self.opts = conf.rpc
        try:
            self._transport = rpc_api.make_transport(conf)
        except (messaging.InvalidTransportURL, messaging.DriverLoadFailure) as exc:
            raise ValueError(f"[DEFAULT] transport_url: {exc}") from exc
        self._client = messaging.get_rpc_client(
            self._transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, version="1.0"))
        self._deliver: Deliver | None = None
        self._cond = threading.Condition()
        self._stopped = threading.Event()        # interrupts every sleep of ours
        self._wake = threading.Event()           # cuts a backoff short
        self._watch = DriverWatch(self._on_trouble, self._on_recovery)
        self._servers: list[messaging.MessageHandlingServer] = []
        # Everything below is guarded by _cond.
        self._stopping = False
        self._listening = False
        self._devices: frozenset[str] | None = None
        self._dirty = False
        self._recovered = False
        self._resync_asked = 0
        self._resync_done = 0
        self._policy: Policy | None = None
        self._index = _Index()
        self._pull_started: float | None = None     # monotonic, while a pull runs
        self._call_started: float | None = None     # monotonic, while one of its calls runs
        self._last_ok_started: float | None = None  # monotonic start of the last good pull
        self._last_ok_at: float | None = None       # wall clock, for status
        self._failing = False
        self._pull_error: str | None = None
        self._trouble_at = float("-inf")
        self._trouble: str | None = None
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------ PolicySource

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._watch.attach()
        threading.Thread(target=self._listen_main, name="rpc-listen", daemon=True).start()
        threading.Thread(target=self._pull_main, name="rpc-pull", daemon=True).start()

    def set_devices(self, devices: frozenset[str]) -> None:
        """New devices need a pull; vanished ones only leave the policy (no RPC)."""
        with self._cond:
            old, self._devices = self._devices, devices
            if old is None or devices - old:
                self._dirty = True
                self._cond.notify_all()
            policy = self._policy
            if policy is not None and any(p.device not in devices for p in policy.ports):
                self._set_policy(replace(policy, ports=tuple(
                    p for p in policy.ports if p.device in devices)))
                self._hand_over()

    def resync(self) -> None:
        """Ask for a full pull and wait for it, at most `[rpc] call_timeout` seconds.

        Returns at once while the controller is known to be unreachable: the
        daemon then reconciles the kernel with the policy in force.
        """
        with self._cond:
            self._resync_asked += 1
            mine = self._resync_asked
            self._cond.notify_all()
            self._wake.set()
            if not self._is_connected(time.monotonic()):
                return
            deadline = time.monotonic() + self.opts.call_timeout
            while self._resync_done < mine and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    LOG.info("resync: the pull did not finish within %.1f s; it will be "
                             "delivered when it does", self.opts.call_timeout)
                    return
                self._cond.wait(left)

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            servers = list(self._servers)
        self._stopped.set()
        self._wake.set()
        self._watch.detach()

        def close() -> None:
            for server in servers:
                server.stop()
            for server in servers:
                server.wait()
            self._transport.cleanup()

        closer = threading.Thread(target=close, name="rpc-stop", daemon=True)
        closer.start()
        closer.join(STOP_TIMEOUT)

    def status(self) -> dict[str, Any]:
        with self._cond:
            now = time.monotonic()
            return {
                "connected": self._is_connected(now),
                "listening": self._listening,
                "last_pull_ok_at": self._last_ok_at,
                "pulls": self._counts["pulls"],
                "rpc_errors": self._counts["pull_failures"],
                "deliveries": self._counts["deliveries"],
                "notifications": self._counts["notifications"],
                "notifications_used": self._counts["notifications_used"],
                "notifications_dropped": self._counts["notifications_dropped"],
                "ports": len(self._policy.ports) if self._policy else 0,
                "error": self._error(now),
            }

    # ------------------------------------------------------------ state (under _cond)

    def _stalled(self, now: float) -> bool:
        """A call stuck well past its timeout: the driver is waiting for the broker."""
        return self._call_started is not None and \
            now - self._call_started > self.opts.call_timeout + 1.0

    def _is_connected(self, now: float) -> bool:
        return (self._listening and not self._failing and not self._stalled(now)
                and self._last_ok_started is not None
                and self._last_ok_started > self._trouble_at)

    def _error(self, now: float) -> str | None:
        broker_trouble = self._trouble_at > (self._last_ok_started or float("-inf"))
        if not self._listening:
            return f"cannot reach the broker: {self._trouble}" if broker_trouble else None
        if self._stalled(now):
            assert self._call_started is not None
            return f"a call has been waiting {now - self._call_started:.0f} s for the broker"
        if broker_trouble:
            return f"broker connection failed: {self._trouble}"
        return self._pull_error

    def _wanted(self) -> bool:
        return (self._listening and self._devices is not None
                and (self._dirty or self._resync_asked > self._resync_done))

    def _set_policy(self, policy: Policy) -> None:
        self._policy = policy
        self._index = _Index.of(policy)

    def _hand_over(self) -> None:
        """Deliver the current policy; under _cond so deliveries keep their order.

        The daemon's deliver only queues, so holding the lock here is cheap.
        """
        if self._deliver is not None and self._policy is not None:
            self._counts["deliveries"] += 1
            self._deliver(self._policy)

    # ------------------------------------------------------------ notifications

    def _on_notice(self, method: str, kwargs: dict[str, Any]) -> None:
        try:
            notice = parse_notice(method, kwargs)
        except Invalid as exc:
            with self._cond:
                self._counts["notifications_dropped"] += 1
            LOG.warning("dropped a malformed notification: %s", exc)
            return
        with self._cond:
            self._counts["notifications"] += 1
            if self._pull_started is None and self._policy is not None and \
                    not self._index.concerns(notice, self._devices or frozenset()):
                return
            self._counts["notifications_used"] += 1
            self._dirty = True
            self._cond.notify_all()
        LOG.debug("notification %s marks the policy dirty", notice)

    def _on_trouble(self, message: str) -> None:
        with self._cond:
            if self._stopping:
                return
            self._trouble_at = time.monotonic()
            self._trouble = message
            self._dirty = True
            self._cond.notify_all()

    def _on_recovery(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._dirty = True
            self._recovered = True
            self._cond.notify_all()
        self._wake.set()
        LOG.info("broker connection restored: pulling everything again, since "
                 "notifications may have been lost")

    # ------------------------------------------------------------ threads

    def _listen_main(self) -> None:
        """Subscribe to the three fanout topics; blocks until the broker answers."""
        notices = (SecurityGroupNotifications(self._on_notice),
                   PortNotifications(self._on_notice))
        for topic, endpoint in ((rpc_api.SG_TOPIC, notices[0]),
                                (rpc_api.PORT_UPDATE_TOPIC, notices[1]),
                                (rpc_api.PORT_DELETE_TOPIC, notices[1])):
            server = messaging.get_rpc_server(
                self._transport, messaging.Target(topic=topic, server=self.host, fanout=True),
                [endpoint])
            with self._cond:
                if self._stopping:
                    return
            server.start()
            with self._cond:
                self._servers.append(server)
        with self._cond:
            self._listening = True
            self._dirty = True
            self._cond.notify_all()
        LOG.info("listening for notifications as %r; pulling from %s", self.host,
                 rpc_api.PLUGIN_TOPIC)

    def _pull_main(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._wanted():
                    self._cond.wait()
                if self._stopping:
                    return
            if self._stopped.wait(self.opts.batch_window):
                return
            self._pull_with_retries()

    def _pull_with_retries(self) -> None:
        """One episode: pull until it works, a reconnect restarts the backoff, or stop."""
        with self._cond:
            self._recovered = False
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(PullFailed),
            wait=(tenacity.wait_exponential(multiplier=0.5, max=self.opts.retry_max_interval)
                  + tenacity.wait_random(0, 0.5)),
            stop=self._give_up,
            sleep=self._backoff,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            retrying(self._pull_once)
        except PullFailed:
            pass  # stopping, or a reconnect: `_pull_main` starts a fresh episode

    def _give_up(self, retry_state: tenacity.RetryCallState) -> bool:
        with self._cond:
            return self._stopping or self._recovered

    def _backoff(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    @staticmethod
    def _log_retry(retry_state: tenacity.RetryCallState) -> None:
        assert retry_state.next_action is not None
        LOG.info("pull attempt %d failed; next attempt in %.1f s", retry_state.attempt_number,
                 retry_state.next_action.sleep)

    def _pull_once(self) -> None:
        with self._cond:
            devices = sorted(self._devices or ())
            asked = self._resync_asked
            self._dirty = False
            started = self._pull_started = time.monotonic()
            self._counts["pulls"] += 1
        try:
            policy = self._fetch(devices)
        except MalformedReply as exc:
            self._pull_failed(f"bad reply from the controller: {exc}", asked, retry=False)
            return
        except (messaging.MessagingException, messaging.MessageUndeliverable, OSError) as exc:
            reason = describe(exc)
            self._pull_failed(reason, asked, retry=True)
            raise PullFailed(reason) from exc
        except Exception as exc:  # an unforeseen driver error: keep the puller alive
            LOG.exception("pull failed unexpectedly")
            reason = describe(exc)
            self._pull_failed(reason, asked, retry=True)
            raise PullFailed(reason) from exc
        with self._cond:
            current = self._devices or frozenset()
            policy = replace(policy, ports=tuple(p for p in policy.ports if p.device in current))
            changed = policy != self._policy
            self._set_policy(policy)
            self._pull_started = None
            self._last_ok_started = started
            self._last_ok_at = time.time()
            self._failing = False
            self._pull_error = None
            if changed:
                for error in policy.errors:
                    LOG.warning("controller data rejected: %s", error)
            if changed or asked > self._resync_done:
                self._hand_over()
            self._resync_done = max(self._resync_done, asked)
            self._cond.notify_all()
        LOG.info("pulled %d devices in %.3f s (%s)", len(devices), time.monotonic() - started,
                  "changed" if changed else "unchanged")

    def _pull_failed(self, reason: str, asked: int, retry: bool) -> None:
        LOG.warning("pull failed: %s", reason)
        with self._cond:
            self._pull_started = None
            self._pull_error = f"pull failed: {reason}"
            self._counts["pull_failures"] += 1
            if retry:
                self._failing = True
                self._dirty = True
            else:
                self._resync_done = max(self._resync_done, asked)
            self._cond.notify_all()

    def _fetch(self, devices: list[str]) -> Policy:
        """Call security_group_info_for_devices chunk by chunk (once even for none).

        retry=0: fail fast and let the tenacity loop own the backoff, instead of
        the driver retrying inside one call. at_least_once (AMQP `mandatory`):
        a request nobody's queue takes, as right after a broker restart before
        the controller re-declared q-plugin, fails at once with
        MessageUndeliverable instead of waiting out the whole timeout.
        """
        client = self._client.prepare(
            version=rpc_api.SG_INFO_VERSION, timeout=self.opts.call_timeout, retry=0,
            transport_options=messaging.TransportOptions(at_least_once=True))
        size = self.opts.chunk_size
        chunks = [devices[i:i + size] for i in range(0, len(devices), size)] or [[]]
        replies = []
        try:
            for chunk in chunks:
                with self._cond:
                    self._call_started = time.monotonic()
                reply = client.call(rpc_api.admin_context(), rpc_api.SG_INFO_METHOD,
                                    devices=chunk, call_version=rpc_api.SG_INFO_VERSION)
                replies.append((chunk, reply))
        finally:
            with self._cond:
                self._call_started = None
        return policy_from_replies(replies)

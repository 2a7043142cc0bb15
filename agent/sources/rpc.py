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
2. A local cache (`agent.sources.rpc_cache.PolicyCache`) holds what the
   controller said about our devices; a notification is resolved, when the
   puller takes it, to the few devices whose pull covers it
   (`devices_to_pull`), and only those are pulled; the reply is merged into
   the cache. A new tap pulls that device alone; a vanished tap or a
   `port_delete` pulls nothing. Everything is pulled only at start, after a
   reconnect or broker trouble, and on `resync` (agent-ctl and the periodic
   timer): those full pulls heal lost or reordered notifications. Devices a
   pull's reply leaves out are asked about with `get_devices_details_list`:
   Neutron's own `network:*` ports (DHCP, routers) are trusted and let
   through, as Neutron's L2 agents do (agent/sources/device_details.py).
3. Leading edge: the puller acts on the first notice at once (plus
   `[rpc] batch_window`, 0 by default) and gathers what arrives while it
   pulls into the next pull. It delivers only a policy that differs from
   the last one (or one that `resync` asked for).
4. Nothing is delivered half-way: only when every chunk got a well-formed
   reply. A failed pull leaves the cache and the policy in force as they
   were and is retried with tenacity (exponential backoff with jitter,
   logged), with its devices still pending; a malformed reply is logged and
   dropped, and waits for the next notification or resync.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import oslo_messaging as messaging
import tenacity
from oslo_config import cfg

from agent.model import Invalid, Policy
from agent.sources import rpc_api
from agent.sources.base import Deliver, PolicySource
from agent.sources.device_details import DeviceDetails, fetch_device_details
from agent.sources.rpc_cache import PolicyCache, devices_to_pull, unexplained
from agent.sources.rpc_messages import MalformedReply, Notice, parse_notice

LOG = logging.getLogger(__name__)
STOP_TIMEOUT = 3.0   # seconds `stop` gives the servers and the transport to close
PULL_THREADS = 4     # chunk calls of a full pull in flight at once
WARN_EVERY = 10.0    # seconds between two warnings about malformed notifications


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
        self._cache = PolicyCache()
        self._full = True                        # the next pull asks for every device
        self._pending: set[str] = set()          # devices to pull
        self._notices: list[Notice] = []         # to resolve against the cache, then pull
        self._in_flight: frozenset[str] | None = None   # devices of the pull under way
        self._delivered: Policy | None = None
        self._recovered = False
        self._resync_asked = 0
        self._resync_done = 0
        self._warned_at = float("-inf")          # last malformed-notification warning
        self._unwarned = 0                       # malformed ones since, not logged
        self._pull_started: float | None = None     # monotonic, while a pull runs
        self._calls: dict[object, float] = {}       # monotonic start of each call in flight
        self._last_ok_started: float | None = None  # monotonic start of the last good pull
        self._last_ok_at: float | None = None       # wall clock, for status
        self._failing = False
        self._pull_error: str | None = None
        self._trouble_at = float("-inf")
        self._trouble: str | None = None
        self._counts: Counter[str] = Counter()

    @property
    def transport(self) -> messaging.Transport:
        """The transport, shared with the report_state heartbeat."""
        return self._transport

    # ------------------------------------------------------------ PolicySource

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._watch.attach()
        threading.Thread(target=self._listen_main, name="rpc-listen", daemon=True).start()
        threading.Thread(target=self._pull_main, name="rpc-pull", daemon=True).start()

    def set_devices(self, devices: frozenset[str]) -> None:
        """A new device is pulled alone; a vanished one leaves the cache (no RPC)."""
        with self._cond:
            old, self._devices = self._devices, devices
            if old is not None and devices - old:
                self._pending |= devices - old
                self._cond.notify_all()
            elif old is None:
                self._cond.notify_all()
            self._pending &= devices
            if old and self._cache.forget_devices(old - devices):
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
                "ports": len(self._cache.ports),
                "error": self._error(now),
            }

    # ------------------------------------------------------------ state (under _cond)

    def _stalled(self, now: float) -> bool:
        """A call stuck well past its timeout: the driver is waiting for the broker."""
        return bool(self._calls) and \
            now - min(self._calls.values()) > self.opts.call_timeout + 1.0

    def _is_connected(self, now: float) -> bool:
        return (self._listening and not self._failing and not self._stalled(now)
                and self._last_ok_started is not None
                and self._last_ok_started > self._trouble_at)

    def _error(self, now: float) -> str | None:
        broker_trouble = self._trouble_at > (self._last_ok_started or float("-inf"))
        if not self._listening:
            return f"cannot reach the broker: {self._trouble}" if broker_trouble else None
        if self._stalled(now):
            return f"a call has been waiting {now - min(self._calls.values()):.0f} s " \
                   "for the broker"
        if broker_trouble:
            return f"broker connection failed: {self._trouble}"
        return self._pull_error

    def _wanted(self) -> bool:
        return (self._listening and self._devices is not None
                and bool(self._full or self._pending or self._notices
                         or self._resync_asked > self._resync_done))

    def _hand_over(self, always: bool = False) -> None:
        """Deliver the cache's policy if it changed (or `always`); under _cond, so
        deliveries keep their order. The daemon's deliver only queues."""
        policy = self._cache.policy()
        if self._deliver is None or (not always and policy == self._delivered):
            return
        self._delivered = policy
        self._counts["deliveries"] += 1
        self._deliver(policy)

    # ------------------------------------------------------------ notifications

    def _on_notice(self, method: str, kwargs: dict[str, Any]) -> None:
        try:
            notice = parse_notice(method, kwargs)
        except Invalid as exc:
            self._dropped(exc)
            return
        with self._cond:
            self._counts["notifications"] += 1
            if notice.method == rpc_api.PORT_DELETE:
                gone = [d for d, p in self._cache.ports.items() if p.id == notice.port_id]
                if self._cache.forget_port(notice.port_id or ""):
                    self._counts["notifications_used"] += 1
                    self._hand_over()
                if self._in_flight is not None:   # its reply may still carry the port
                    self._pending |= set(gone) & self._in_flight
                    self._cond.notify_all()
                return
            self._notices.append(notice)
            self._cond.notify_all()
        LOG.debug("notification %s queued", notice)

    def _dropped(self, exc: Exception) -> None:
        """Count a malformed notification; warn at most every WARN_EVERY seconds."""
        now = time.monotonic()
        with self._cond:
            self._counts["notifications_dropped"] += 1
            if now - self._warned_at < WARN_EVERY:
                self._unwarned += 1
                return
            self._warned_at, skipped, self._unwarned = now, self._unwarned, 0
        LOG.warning("dropped a malformed notification: %s%s", exc,
                    f" ({skipped} more dropped since the last warning)" if skipped else "")

    def _on_trouble(self, message: str) -> None:
        with self._cond:
            if self._stopping:
                return
            self._trouble_at = time.monotonic()
            self._trouble = message
            self._full = True   # notifications may be lost while the broker is in trouble
            self._cond.notify_all()

    def _on_recovery(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._full = True
            self._recovered = True
            self._cond.notify_all()
        self._wake.set()
        LOG.info("broker connection restored: pulling everything again, since "
                 "notifications may have been lost")

    # ------------------------------------------------------------ threads

    def _listen_main(self) -> None:
        """Subscribe to the three fanout topics at once; blocks until the broker answers.

        Each server's start declares its queue and consumer (a few broker round
        trips); run side by side they cost a start's time, not three.
        """
        notices = (SecurityGroupNotifications(self._on_notice),
                   PortNotifications(self._on_notice))
        servers = [messaging.get_rpc_server(
            self._transport, messaging.Target(topic=topic, server=self.host, fanout=True),
            [endpoint]) for topic, endpoint in ((rpc_api.SG_TOPIC, notices[0]),
                                                (rpc_api.PORT_UPDATE_TOPIC, notices[1]),
                                                (rpc_api.PORT_DELETE_TOPIC, notices[1]))]

        def start(server: messaging.MessageHandlingServer) -> None:
            with self._cond:
                if self._stopping:
                    return
            server.start()
            with self._cond:
                self._servers.append(server)

        starters = [threading.Thread(target=start, args=(server,), name="rpc-listen",
                                     daemon=True) for server in servers]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        with self._cond:
            if self._stopping or len(self._servers) < len(servers):
                return
            self._listening = True
            self._full = True
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
            if self.opts.batch_window and self._stopped.wait(self.opts.batch_window):
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

    def _take_work(self) -> tuple[list[str], bool, int] | None:
        """Under _cond: (devices, full, resync number) of the next pull, or None when
        the queued notices concern no local device."""
        current = self._devices or frozenset()
        asked = self._resync_asked
        full = self._full or asked > self._resync_done
        notices, self._notices = self._notices, []
        if full:
            devices = set(current)
            self._full = False
        else:
            devices = set(self._pending)
            for notice in notices:
                wanted = devices_to_pull(notice, self._cache, current)
                if wanted:
                    self._counts["notifications_used"] += 1
                devices.update(wanted)
            devices &= current
        self._pending = set()
        if not devices and not full:
            return None
        return sorted(devices), full, asked

    def _pull_once(self) -> None:
        with self._cond:
            work = self._take_work()
            if work is None:
                return
            devices, full, asked = work
            self._in_flight = frozenset(devices)
            started = self._pull_started = time.monotonic()
            self._counts["pulls"] += 1
            self._counts["full_pulls" if full else "partial_pulls"] += 1
        try:
            replies = self._fetch(devices)
            details = self._trusted(unexplained(replies))
            with self._cond:
                self._cache.merge(replies, full, details)
        except MalformedReply as exc:
            self._pull_failed(f"bad reply from the controller: {exc}", asked, retry=False)
            return
        except (messaging.MessagingException, messaging.MessageUndeliverable, OSError) as exc:
            reason = describe(exc)
            self._pull_failed(reason, asked, retry=True, full=full, devices=devices)
            raise PullFailed(reason) from exc
        except Exception as exc:  # an unforeseen driver error: keep the puller alive
            LOG.exception("pull failed unexpectedly")
            reason = describe(exc)
            self._pull_failed(reason, asked, retry=True, full=full, devices=devices)
            raise PullFailed(reason) from exc
        with self._cond:
            self._cache.forget_devices(set(devices) - (self._devices or frozenset()))
            self._pull_started = None
            self._in_flight = None
            self._last_ok_started = started
            self._last_ok_at = time.time()
            self._failing = False
            self._pull_error = None
            before = self._delivered
            self._hand_over(always=full and asked > self._resync_done)
            changed = self._delivered is not before
            if changed:
                for error in self._cache.policy().errors:
                    LOG.warning("controller data rejected: %s", error)
            if full:
                self._resync_done = max(self._resync_done, asked)
            self._cond.notify_all()
        LOG.info("pulled %d device%s (%s) in %.3f s (%s)", len(devices),
                 "" if len(devices) == 1 else "s", "all" if full else "targeted",
                 time.monotonic() - started, "changed" if changed else "unchanged")

    def _trusted(self, devices: list[str]) -> DeviceDetails | None:
        """Ask which of `devices` are Neutron's own network:* ports (trusted).

        A controller that cannot answer does not fail the pull: those devices
        stay unknown (dropped, fail closed) until the next pull, and the
        error shows in status.
        """
        if not devices:
            return None
        try:
            return fetch_device_details(self._client, devices, self.opts.call_timeout,
                                        self.host, self.opts.chunk_size)
        except (messaging.MessagingException, messaging.MessageUndeliverable, OSError,
                MalformedReply) as exc:
            LOG.warning("get_devices_details_list failed: %s", describe(exc))
            return DeviceDetails({}, (f"cannot tell whether {len(devices)} unknown "
                                      f"device(s) are trusted network ports: "
                                      f"{describe(exc)}",))

    def _pull_failed(self, reason: str, asked: int, retry: bool, full: bool = False,
                     devices: list[str] | None = None) -> None:
        """Log and count; with `retry`, the same pull stays pending (backoff is tenacity's)."""
        LOG.warning("pull failed: %s", reason)
        with self._cond:
            self._pull_started = None
            self._in_flight = None
            self._pull_error = f"pull failed: {reason}"
            self._counts["pull_failures"] += 1
            if retry:
                self._failing = True
                self._full = self._full or full
                self._pending |= set(devices or ())
            else:
                self._resync_done = max(self._resync_done, asked)
            self._cond.notify_all()

    def _fetch(self, devices: list[str]) -> list[tuple[list[str], Any]]:
        """Call security_group_info_for_devices chunk by chunk (once even for none),
        up to PULL_THREADS chunks at a time; returns (chunk, reply) pairs in order.

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

        def call(chunk: list[str]) -> tuple[list[str], Any]:
            token = object()
            with self._cond:
                self._calls[token] = time.monotonic()
            try:
                return chunk, client.call(rpc_api.admin_context(), rpc_api.SG_INFO_METHOD,
                                          devices=chunk, call_version=rpc_api.SG_INFO_VERSION)
            finally:
                with self._cond:
                    del self._calls[token]

        if len(chunks) == 1:
            return [call(chunks[0])]
        with ThreadPoolExecutor(min(PULL_THREADS, len(chunks)),
                                thread_name_prefix="rpc-pull") as pool:
            return list(pool.map(call, chunks))

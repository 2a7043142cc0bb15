"""hostfw-controller: serve a policy file to agents over Neutron's RPC API.

Rules of this room:

1. The file (`[controller] policy_file`, CONTRACT 4.1) is parsed by the same
   code as the agent's standalone mode; a file that cannot be loaded at
   start is fatal (serving an empty policy would cut every VM off), later it
   keeps the last good policy in force.
2. On a change, the new snapshot is swapped in *before* the notifications go
   out, so an agent that pulls because of them sees the new state.
3. A (re)start sends nothing: agents already hold what the file says, and
   they pull everything on their own start, reconnect and periodic resync.
4. The RPC server starts on its own thread, because `server.start()` blocks
   while the broker is down; SIGTERM must still stop the process.
5. With `[controller] rpc_workers` > 0 the answering moves to that many
   worker processes (workers.py) and this process keeps the watch, the
   diff and the casts; rule 2 then means every worker serves the new
   policy before the casts go out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_log import log as oslo_logging
from oslo_messaging import opts as messaging_opts

from agent import config, version_line
from agent.controller.diff import diff
from agent.controller.endpoint import AgentReports, SecurityGroupInfo, Snapshot
from agent.controller.notifier import AgentNotifier
from agent.controller.workers import AnswerWorkers
from agent.sources import rpc_api
from agent.sources.filewatch import FileWatcher
from agent.sources.policy_file import PolicyFileError, PolicyLoader

LOG = logging.getLogger("hostfw.controller")
STOP_TIMEOUT = 3.0


class Controller:
    """The policy in force, the q-plugin server and the notifier."""

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport,
                 workers: AnswerWorkers | None = None) -> None:
        self.path: str = conf.controller.policy_file
        self.snapshot = Snapshot()
        self._loader = PolicyLoader()   # unchanged objects are reused, not parsed again
        self.notifier = AgentNotifier(transport)
        self.workers = workers
        self.server = None if workers else messaging.get_rpc_server(
            transport, messaging.Target(topic=rpc_api.PLUGIN_TOPIC, server=conf.host),
            [SecurityGroupInfo(lambda: self.snapshot)])
        # Agents configured for Neutron heartbeat on q-reports-plugin; hear them,
        # so they do not time out against hostfw-controller.
        self.reports = messaging.get_rpc_server(
            transport, messaging.Target(topic=rpc_api.REPORTS_TOPIC, server=conf.host),
            [AgentReports()])

    def serve(self, snapshot: Snapshot) -> None:
        """Put `snapshot` in force: here, and in every worker before this returns."""
        self.snapshot = snapshot
        if self.workers is not None:
            self.workers.publish(snapshot.policy)

    def load(self) -> Snapshot:
        """Read and parse the file; raises OSError or PolicyFileError."""
        with open(self.path, encoding="utf-8") as handle:
            policy = self._loader.load(handle.read(), self.path)
        for error in policy.errors:
            LOG.warning("policy file %s: %s", self.path, error)
        return Snapshot.of(policy)

    def reload(self, reason: str) -> None:
        """Load the file again and notify agents of what changed.

        The log line gives the time of each step, so an operator (and
        bench/fleet.py) can see where a change's first milliseconds went.
        """
        started = time.perf_counter()
        try:
            new = self.load()
        except (OSError, PolicyFileError) as exc:
            LOG.error("reload (%s) failed: %s; keeping the policy in force", reason, exc)
            return
        loaded = time.perf_counter()
        notes = diff(self.snapshot.policy, new.policy)
        if notes:
            self.serve(new)
        else:
            self.snapshot = new   # the same content: the workers' copies stay right
        swapped = time.perf_counter()
        if not notes:
            LOG.info("reload (%s): no change (load %.1f ms)", reason,
                     (loaded - started) * 1000)
            return
        sent = self.notifier.send(notes)
        LOG.info("reload (%s): %d rule, %d member, %d port update, %d port delete "
                 "notifications (%d casts sent); load %.1f ms, diff+swap %.1f ms, "
                 "casts %.1f ms",
                 reason, len(notes.rules_updated), len(notes.members_updated),
                 len(notes.ports_updated), len(notes.ports_deleted), sent,
                 (loaded - started) * 1000, (swapped - loaded) * 1000,
                 (time.perf_counter() - swapped) * 1000)


def parse_args(argv: list[str] | None) -> cfg.ConfigOpts:
    conf = cfg.CONF   # oslo.messaging needs the global object (see rpc_api)
    config.register_opts(conf)
    config.set_log_defaults(conf)   # oslo.log, as the agent: stderr, --debug, log_file
    conf(argv, project="hostfw", prog="hostfw-controller",
         version=version_line("hostfw-controller"),
         default_config_files=[f for f in ["/etc/hostfw/agent.conf"] if os.path.exists(f)])
    size_reply_pool(conf)
    return conf


def size_reply_pool(conf: cfg.ConfigOpts) -> None:
    """Give every RPC executor thread an AMQP connection to publish its reply on.

    oslo.messaging's defaults are 64 executor threads and 30 pooled
    connections: in a pull storm the other 34 queue for a connection and
    log "Connection pool limit exceeded" hundreds of times. An operator's
    own `rpc_conn_pool_size` still wins; this only moves the default.
    """
    wanted = {(None, "executor_thread_pool_size"), ("oslo_messaging_rabbit", "rpc_conn_pool_size")}
    for group, opts in messaging_opts.list_opts():
        for opt in opts:
            if (group, opt.name) in wanted:   # as the driver will; set_default needs them
                try:
                    conf.register_opt(opt, group=group)
                except cfg.DuplicateOptError:
                    pass
    conf.set_default("rpc_conn_pool_size", conf.executor_thread_pool_size,
                     group="oslo_messaging_rabbit")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        conf = parse_args(args)
    except cfg.Error as exc:
        print(f"hostfw-controller: {exc}", file=sys.stderr)
        return 2
    problems = config.value_problems(conf)  # a bad value: a line on stderr, not a traceback
    if problems:
        for problem in problems:
            print(f"hostfw-controller: {problem}", file=sys.stderr)
        return 2
    oslo_logging.setup(conf, "hostfw")
    try:
        transport = rpc_api.make_transport(conf)
    except (cfg.Error, messaging.InvalidTransportURL, messaging.DriverLoadFailure) as exc:
        print(f"hostfw-controller: {exc}", file=sys.stderr)
        return 2
    workers = (AnswerWorkers(conf.controller.rpc_workers, args)
               if conf.controller.rpc_workers else None)
    controller = Controller(conf, transport, workers)
    watcher = FileWatcher(controller.path, conf.controller.watch_interval, controller.reload)
    try:
        first = controller.load()
    except (OSError, PolicyFileError) as exc:
        print(f"hostfw-controller: {exc}", file=sys.stderr)
        return 1
    controller.serve(first)
    policy = controller.snapshot.policy
    LOG.info("serving %s: %d ports, %d security groups%s", controller.path,
             len(policy.ports), len(policy.groups),
             f", answered by {workers.count} workers" if workers else "")

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: watcher.request("SIGHUP"))
    servers = [(s, what) for s, what in (
        (controller.server, f"{rpc_api.SG_INFO_METHOD} on {rpc_api.PLUGIN_TOPIC}"),
        (controller.reports, f"report_state on {rpc_api.REPORTS_TOPIC}")) if s is not None]
    started = [threading.Thread(target=_serve, args=pair, name="rpc-server", daemon=True)
               for pair in servers]
    for thread in started:
        thread.start()
    watcher.start()
    while not stopping.wait(1.0):
        pass
    watcher.stop()
    if workers is not None:
        workers.stop()
    closer = threading.Thread(target=_close, args=([s for s, _ in servers], started, transport),
                              name="rpc-stop", daemon=True)
    closer.start()
    closer.join(STOP_TIMEOUT)
    LOG.info("hostfw-controller stopped")
    return 0


def _serve(server: messaging.MessageHandlingServer, what: str) -> None:
    server.start()   # blocks until the broker answers
    LOG.info("answering %s", what)


def _close(servers: list[messaging.MessageHandlingServer], started: list[threading.Thread],
           transport: messaging.Transport) -> None:
    for thread in started:
        thread.join()
    for server in servers:
        server.stop()
    for server in servers:
        server.wait()
    transport.cleanup()


if __name__ == "__main__":
    sys.exit(main())

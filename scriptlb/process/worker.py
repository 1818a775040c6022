"""One worker: a uvloop event loop serving the inherited listening sockets.

``run(conf, listeners, worker_id, worker_count)`` is what the master calls in each forked worker
(and in-process with ``master_process off``). It builds the ``Runtime`` once, starts a server per
distinct listening socket and serves until a signal says stop:

* QUIT (graceful): stop accepting, let in-flight requests finish (their connections then close
  instead of staying keep-alive), close idle keep-alive connections and pooled upstream ones,
  exit;
* TERM / INT (fast): close everything now and exit;
* USR1: reopen log files.

``WorkerThread`` runs the same worker in a thread of the calling process (tests, benchmarks);
signals are replaced by ``stop(graceful=...)``.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import uvloop

from scriptlb.config.model import HttpConf, ListenKey, MainConf, ServerConf, StreamServerConf
from scriptlb.hookrt import api
from scriptlb.http import safety
from scriptlb.http.downstream import (
    ClientConnection,
    ListenerContext,
    ProxyProtocolConnection,
    refuse_requests,
)
from scriptlb.logs import errorlog
from scriptlb.ops import cluster
from scriptlb.ops.status import StatusFull, WorkerStatus, rows_for
from scriptlb.process.signals import tell_master_retiring
from scriptlb.request.exchange import Exchange, log_client_error
from scriptlb.request.runtime import Runtime
from scriptlb.sandbox.limits import install_worker_fuse
from scriptlb.state.peer_lists import PeerListStore, PeerListWatcher, effective_conf
from scriptlb.state.shared_dict import SharedDict, SyncedSharedDict, map_size, zone_directory
from scriptlb.state.stats import PeerStats, Recorder, StatsFull, layout_of, shards_for, stream_layout_of

PASSIVE_SYNC = 0.1  # seconds between two readings of the shared passive health (zone upstreams)

# A graceful stop waits for in-flight requests, checking this often.
_DRAIN_POLL = 0.05


class Worker:
    def __init__(self, conf: MainConf, listeners: dict[ListenKey, socket.socket],
                 loop: asyncio.AbstractEventLoop, worker_id: int = 0, worker_count: int = 1) -> None:
        self.conf = conf
        self.listeners = listeners
        self.loop = loop
        self.worker_id = worker_id
        self.worker_count = worker_count
        self.runtime: Runtime | None = None
        self.stats: PeerStats | None = None
        self.recorder: Recorder | None = None  # this worker's tries, published to self.stats
        self.status: WorkerStatus | None = None  # connection/request counters (stub_status)
        self.hook_figures: Any = None  # scriptlb.ops.metrics.HookFiguresPublisher
        self.contexts: list[ListenerContext] = []
        self.stream: Any = None  # scriptlb.stream.runtime.StreamRuntime with a stream block
        self._servers: list[asyncio.AbstractServer] = []
        self._stop: asyncio.Future[bool] | None = None  # result: graceful?
        self._unblock_signals: set[int | signal.Signals] | None = None  # the mask serve() restores
        self.ready = threading.Event()
        self.freeze_gc = False  # True in a worker process (run), not in a test's thread
        self.cluster: cluster.ClusterNode | None = None  # master_process off: the sync tasks

    async def serve(self) -> None:
        self._stop = self.loop.create_future()
        if self._unblock_signals is not None:  # (install_signals: now the loop hears them)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._unblock_signals)
            self._unblock_signals = None
        if self.loop.get_exception_handler() is None:
            # a bug escaping a callback: an [alert] line in the error log, not a traceback on
            # stderr (a test's WorkerThread installs its own, which records them)
            self.loop.set_exception_handler(safety.loop_error)
        loaded_http = self.conf.http
        store = PeerListStore(zone_directory(self.conf.prefix)) if loaded_http is not None else None
        if store is not None:
            self.conf = effective_conf(self.conf, store)  # run-time server lists (the API)
        self.stats = open_peer_stats(self.conf)
        if self.stats is not None:
            self.recorder = Recorder(self.stats, self.loop)
        self.runtime = Runtime(self.conf, self.loop, self.recorder)
        if self.conf.stream is not None:
            from scriptlb.stream.runtime import StreamRuntime

            self.stream = StreamRuntime(self.conf, self.loop, self.recorder)
            self.runtime.stream = self.stream  # the API's /stream/upstreams
        self.status = open_status(self.conf, self.worker_id)
        self.runtime.status = self.status
        if store is not None and loaded_http is not None:
            self.runtime.peer_lists = PeerListWatcher(store, loaded_http, self.runtime.replace_servers)
            # only then can lists change: the API, or membership from etcd or DNS
            if _has_handler(loaded_http, "api", write=True) or cluster.feeds_peer_lists(loaded_http):
                self.runtime.peer_lists.start(self.loop)
        self._start_health_checks(self.runtime)
        self._start_passive_sync(self.runtime)
        self._start_hook_figures(self.runtime)
        await self._start_servers(self.runtime)
        if self.status is not None:
            self.status.runtime = self.runtime
            shared = {id(c.connections): c.connections for c in self.contexts}  # one set per worker
            self.status.connection_sets = list(shared.values())
            self.status.contexts = self.contexts
            if _reads_status(self.conf):  # otherwise nobody reads the other workers' rows
                self.status.start(self.loop)
        if not self.conf.master_process and cluster.needed(self.conf):
            self.cluster = cluster.ClusterNode(self.conf)  # no master to fork a cluster process
            self.cluster.start(self.loop)
        if self.freeze_gc:
            # Everything alive now (modules, config, runtime) lives as long as the worker
            # process: keep it out of the cyclic GC's scans, which would walk it again and again.
            gc.collect()
            gc.freeze()
        self.ready.set()
        graceful = await self._stop
        await self._shutdown(graceful)

    def _start_hook_figures(self, runtime: Runtime) -> None:
        """With a prometheus location and hooks: share this worker's hook runs."""
        http = self.conf.http
        if http is None or not http.hooks() or not any(
            loc.handler == "prometheus" for server in http.servers for loc in server.locations
        ):
            return
        from scriptlb.ops.metrics import HookFiguresPublisher

        self.hook_figures = HookFiguresPublisher(runtime, zone_directory(self.conf.prefix))
        self.hook_figures.start(self.loop)

    def _start_passive_sync(self, runtime: Runtime) -> None:
        """``zone`` upstreams share their peers' passive health (max_fails) between workers, as
        nginx's zone does: each worker takes the shared state every ``PASSIVE_SYNC`` seconds
        (its own failures count at once; another worker's within that time)."""
        if runtime.recorder is None or not any(u.conf.zone for u in runtime.upstreams.values()):
            return
        loop = self.loop

        def tick() -> None:
            try:
                runtime.sync_passive()
            finally:
                loop.call_later(PASSIVE_SYNC, tick)

        loop.call_later(PASSIVE_SYNC, tick)

    def _start_health_checks(self, runtime: Runtime) -> None:
        """health_check: every worker applies the shared state; each checks its share."""
        from scriptlb.ops.health import HealthChecker, HealthView, checked_upstreams

        if not checked_upstreams(runtime):
            return
        runtime.health = HealthView(runtime)
        runtime.health.start(self.loop)
        runtime.health_checker = HealthChecker(runtime, self.worker_id, self.worker_count)
        runtime.health_checker.sync(self.loop, first=True)

    async def _start_servers(self, runtime: Runtime) -> None:
        connections: set[ClientConnection] = set()  # worker_connections counts them all
        reusable: dict[ClientConnection, None] = {}  # the ones that may make room, oldest first
        by_socket: dict[int, tuple[socket.socket, list[ListenKey]]] = {}
        for key, sock in self.listeners.items():
            by_socket.setdefault(id(sock), (sock, []))[1].append(key)
        for sock, keys in by_socket.values():
            route = runtime.routes.get(keys[0])
            if route is None:
                await self._start_stream_server(sock, keys)
                continue
            server_conf = route.default_server.conf
            context = ListenerContext(
                partial(Exchange, runtime),
                header_timeout=server_conf.client_header_timeout,
                header_buffers=server_conf.large_client_header_buffers,
                max_headers=server_conf.max_headers,
                keys=tuple(keys),
                connections=connections,
                max_connections=self.conf.worker_connections,
                underscores_in_headers=server_conf.underscores_in_headers,
                ignore_invalid_headers=server_conf.ignore_invalid_headers,
                reusable=reusable,
            )
            context.proxy_protocol = any(listen.proxy_protocol for server in runtime.servers.values()
                                         for listen in server.conf.listens if listen.key in keys)
            context.on_client_error = partial(log_client_error, runtime)
            self.contexts.append(context)
            tls = runtime.tls_context(keys)
            factory: Callable[[], asyncio.Protocol] = _protocol_factory(context, self.loop, self.status)
            if tls is not None:
                # TLS is terminated by our own protocol (memory BIOs), not the loop's
                from scriptlb.http.tls_transport import (  # (TLS configs only)
                    listen_text,
                    tls_protocol_factory,
                )

                factory = tls_protocol_factory(factory, tls, self.loop, server_conf.client_header_timeout,
                                               listen_text(keys[0]), refuse_requests)
            server = await self.loop.create_server(factory, sock=sock, backlog=self._backlog(keys))
            self._servers.append(server)

    async def _start_stream_server(self, sock: socket.socket, keys: list[ListenKey]) -> None:
        if sock.type == socket.SOCK_DGRAM:  # `listen ... udp`: read by the stream runtime itself
            if self.stream is not None:
                self.stream.listen_datagrams(sock, keys)
            return
        factory = self.stream.session_factory(keys) if self.stream is not None else None
        if factory is None:
            return
        tls = self.stream.ssl_context(keys)
        if tls is not None:
            from scriptlb.http.tls_transport import listen_text, tls_protocol_factory  # (TLS configs only)

            context, handshake_timeout = tls
            factory = tls_protocol_factory(factory, context, self.loop, handshake_timeout,
                                           listen_text(keys[0]), None)
        server = await self.loop.create_server(factory, sock=sock, backlog=self._backlog(keys))
        self._servers.append(server)

    def _backlog(self, keys: list[ListenKey]) -> int:
        """The configured ``listen ... backlog=N``: asyncio calls listen() again with it, so it
        must be the master's value, not asyncio's default of 100."""
        http = self.conf.http
        servers: list[ServerConf | StreamServerConf] = [
            *(http.servers if http is not None else ()),
            *(self.conf.stream.servers if self.conf.stream is not None else ())]
        backlogs = [listen.backlog for server in servers for listen in server.listens if listen.key in keys]
        return max(backlogs, default=511)

    def stop(self, graceful: bool) -> None:
        """Ask the worker to stop (call in the loop's thread)."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(graceful)
        elif self._stop is not None and not graceful:
            self._close_all()

    def _close_all(self) -> None:
        for context in self.contexts:
            for conn in list(context.connections):
                conn.close()
        if self.stream is not None:
            for session in self.stream.sessions():
                session.close()

    async def _shutdown(self, graceful: bool) -> None:
        runtime = self.runtime
        if runtime is not None and runtime.health_checker is not None:
            runtime.health_checker.stop()  # the next generation's worker takes the checks over
            runtime.health.stop()
        for server in self._servers:
            server.close()  # stop accepting
        if self.stream is not None:
            self.stream.stop_datagrams()  # (nginx ends datagram sessions on a worker's stop)
        # connections accepted in this loop turn get connection_made in the next: let them
        # register before draining, or the worker exits under them
        await asyncio.sleep(0)
        for context in self.contexts:
            context.shutting_down = True
            for conn in list(context.connections):
                if not graceful:
                    conn.close()
                else:
                    conn.close_if_idle()
        if not graceful:
            self._close_all()
            # connection_lost comes a loop turn after close(): let requests in flight end
            # (and write their access log lines) before the logs close
            await asyncio.sleep(0)
        else:
            await self._drain()
        if self.cluster is not None:
            await self.cluster.stop(graceful)
        if self.runtime is not None:
            if self.runtime.peer_lists is not None:
                self.runtime.peer_lists.stop()
            self.runtime.close()
        if self.stream is not None:
            self.stream.close()
        if self.recorder is not None:
            self.recorder.flush()  # the last tries count too
        if self.hook_figures is not None:
            self.hook_figures.close()
        if self.status is not None:
            self.status.close()
            self.status = None
            if self.runtime is not None:
                self.runtime.status = None
        if self.stats is not None:
            self.stats.close()  # gives the shard back for the next generation of workers
            self.stats = None
        # give transports one loop turn to close their sockets (TLS ones too: ours send their
        # close_notify and do not wait for the client's)
        await asyncio.sleep(0)

    async def _drain(self) -> None:
        """Wait until every client connection closed (each closes after its active request)
        and every stream session ended, at most ``worker_shutdown_timeout`` (0: no limit);
        then what is left is closed, as nginx does."""
        limit = self.conf.worker_shutdown_timeout
        deadline = self.loop.time() + limit if limit else None
        while any(context.connections for context in self.contexts) or (
                self.stream is not None and self.stream.sessions()):
            if deadline is not None and self.loop.time() >= deadline:
                errorlog.log_error("notice", "worker_shutdown_timeout: closing the remaining connections")
                self._close_all()
                await asyncio.sleep(0)
                return
            for context in self.contexts:
                for conn in list(context.connections):
                    conn.close_if_idle()
            await asyncio.sleep(_DRAIN_POLL)  # polled: a drain is rare

    def install_signals(self) -> None:
        """The loop's handlers replace the early ones (``prepare_worker_signals``). The signals
        stay blocked until ``serve`` runs in the loop: uvloop hears of a signal through its
        wakeup descriptor, which exists only while the loop runs; one that came before (a QUIT
        sent right after a reload's fork) was noted by its handler and never acted on, and
        that worker, and so the master, ran on. Unblocked in the running loop, a pending one
        takes the wakeup path to ``_on_signal``."""
        loop = self.loop
        signals = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        self._unblock_signals = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        for signo in signals:
            loop.add_signal_handler(signo, self._on_signal, signo)

    def _on_signal(self, signo: signal.Signals) -> None:
        if signo == signal.SIGUSR1:
            errorlog.reopen()
            if self.runtime is not None:
                self.runtime.reopen_logs()
            if self.stream is not None:
                self.stream.reopen_logs()
            return
        if signo == signal.SIGQUIT:
            errorlog.log_error("notice", "gracefully shutting down")
            tell_master_retiring()
        else:
            errorlog.log_error("notice", "exiting")
        self.stop(graceful=signo == signal.SIGQUIT)


def _protocol_factory(
    context: ListenerContext, loop: asyncio.AbstractEventLoop, status: WorkerStatus | None = None
) -> Callable[[], ClientConnection]:
    kind = ProxyProtocolConnection if context.proxy_protocol else ClientConnection
    if status is None:
        def factory() -> ClientConnection:
            return kind(context, loop)
    else:
        def factory() -> ClientConnection:
            status.accepted += 1  # nginx's "accepts" (stub_status, $connections_*)
            return kind(context, loop)

    return factory


def run(
    conf: MainConf, listeners: dict[ListenKey, socket.socket], worker_id: int = 0, worker_count: int = 1
) -> None:
    """Serve until QUIT/TERM/INT; the master's entry point into a worker process."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    attach_hook_runtime(conf, worker_id, worker_count, arm_fuse=conf.master_process)
    worker = Worker(conf, listeners, loop, worker_id, worker_count)
    worker.freeze_gc = True
    try:
        worker.install_signals()
        loop.run_until_complete(worker.serve())
    finally:
        _close_loop(loop)


def attach_hook_runtime(conf: MainConf, worker_id: int, worker_count: int, arm_fuse: bool) -> None:
    """Give hooks this worker's identity and shared dicts, and arm the sandbox's hard fuse.

    The fuse kills a worker stuck in one hook run (a single C call no budget check can stop);
    the master then replaces it. It is armed only under a master: with ``master_process off``
    it would kill the only process.
    """
    api.set_worker(worker_id, worker_count)
    http = conf.http
    if http is None:
        stream_hooks = conf.stream.hooks() if conf.stream is not None else ()
        if stream_hooks and arm_fuse:
            install_worker_fuse(hard_seconds=max(2.0, 50 * max(h.timeout for h in stream_hooks)),
                                memory_bytes=0)
        return
    if http.shared_dicts:
        directory = zone_directory(conf.prefix)
        api.set_shared_dicts({
            name: (SyncedSharedDict if zone.sync is not None else SharedDict)(directory, name, zone.size)
            for name, zone in http.shared_dicts.items()
        })
    hooks = http.hooks() + (conf.stream.hooks() if conf.stream is not None else ())
    if hooks and arm_fuse:
        install_worker_fuse(hard_seconds=max(2.0, 50 * max(h.timeout for h in hooks)),
                            memory_bytes=worker_memory_limit(http))


def open_peer_stats(conf: MainConf) -> PeerStats | None:
    """This worker's view of the instance's live peer statistics (``python_peer_stats``).

    None when they are off, or cannot be had (unwritable prefix, every shard held by a live
    process): the worker then serves without them and says why once, as a worker must not
    refuse traffic over a figure hooks may read."""
    http = conf.http
    checked = any(u.health_checks for u in http.upstreams.values()) if http is not None else False
    layout = (layout_of(http) if http is not None else ()) + stream_layout_of(conf.stream)
    wanted = http.python.peer_stats if http is not None else True
    if not layout or not (wanted or checked):
        return None  # health checks keep their state in the statistics: on with them
    try:
        return PeerStats.open(zone_directory(conf.prefix), layout,
                              shards=shards_for(conf.worker_processes))
    except (OSError, StatsFull, ValueError) as err:
        errorlog.log_error("alert", f"peer statistics unavailable, serving without them: {err}")
        return None


def _has_handler(http: HttpConf, name: str, write: bool = False) -> bool:
    return any(loc.handler == name and (loc.api_write or not write)
               for server in http.servers for loc in server.locations)


def _reads_status(conf: MainConf) -> bool:
    """Does anything read the instance's counters (stub_status, the API, the metrics, the
    $connections_* variables)? Only then does a worker publish its row every 100 ms."""
    http = conf.http
    if http is None:
        return False
    if any(_has_handler(http, name) for name in ("stub_status", "api", "prometheus")):
        return True
    for path in conf.files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if "$connections_" in f.read():
                    return True
        except OSError:
            return True  # cannot tell: publish
    return False


def open_status(conf: MainConf, worker_id: int = -1) -> WorkerStatus | None:
    """This worker's row of the instance's connection and request counters, or None (after
    an alert) when they cannot be had: a worker serves without them rather than not at all."""
    if conf.http is None:
        return None
    try:
        return WorkerStatus(zone_directory(conf.prefix), rows_for(conf.worker_processes), worker_id)
    except (OSError, StatusFull, ValueError) as err:
        errorlog.log_error("alert", f"connection counters unavailable, serving without them: {err}")
        return None


def worker_memory_limit(http: HttpConf) -> int:
    """The resident memory above which the fuse retires a worker running hooks:
    ``python_memory_limit`` plus what the shared dict zones map (their pages count as resident
    too, sized by the zones, not by hook code)."""
    limit = http.python.memory_limit
    if limit == 0:
        return 0
    return limit + sum(map_size(zone.size) for zone in http.shared_dicts.values())


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


class WorkerThread:
    """A worker in a thread of this process, for tests and benchmarks.

    ``use_uvloop=False`` runs it on the plain asyncio loop (the tests run both).
    """

    def __init__(
        self,
        conf: MainConf,
        listeners: dict[ListenKey, socket.socket],
        use_uvloop: bool = True,
        install_error_log: bool = True,
    ) -> None:
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.worker = Worker(conf, listeners, self.loop)
        self.error: BaseException | None = None
        # what reached the loop's exception handler (a bug escaping a callback): tests assert
        # it stays empty
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._on_loop_error)
        # the process's error log becomes the config's while the thread runs (the master does
        # this for real workers); the previous one comes back on stop()
        self._error_log = errorlog.ErrorLog(conf.error_log) if install_error_log else None
        self._previous_error_log: errorlog.ErrorLog | None = None
        self._thread = threading.Thread(target=self._main, name="scriptlb-worker", daemon=True)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.worker.serve())
        except BaseException as exc:  # reported to the test through .error and start()
            self.error = exc
            self.worker.ready.set()
        finally:
            _close_loop(self.loop)

    def start(self, timeout: float = 10.0) -> WorkerThread:
        if self._error_log is not None:
            self._previous_error_log = errorlog.install(self._error_log)
        self._thread.start()
        if not self.worker.ready.wait(timeout):
            raise TimeoutError("worker did not start")
        if self.error is not None:
            raise self.error
        return self

    def call(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self, graceful: bool = False, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.stop, graceful)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("worker did not stop")
        if self._previous_error_log is not None:
            errorlog.install(self._previous_error_log).close()
            self._previous_error_log = None

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

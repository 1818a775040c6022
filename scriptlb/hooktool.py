"""``scriptlb hook run FILE ...``: run one balancer hook once, under the real sandbox and limits,
against a synthetic request, and print one JSON line describing what it decided.

    scriptlb hook run hooks/hash_by_uri.py --uri /a/b --header 'Cookie: id=7' \\
        --peers 127.0.0.1:9001,127.0.0.1:9002 --last-failure failed:502

Output: ``{"outcome": "ok"|"compile_error"|"runtime_error"|"timeout"|"exit", "peer": ...,
"host": ..., "more_tries": ..., "timeouts": {...}, "exit_status": ..., "logs": [...],
"error": ...}``; the exit status is 0 only for "ok" and "exit". A run that sets no peer is "ok"
with ``"peer": null`` (the proxy would fall back to round robin) and says so in "error".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from scriptlb.api import short_text
from scriptlb.config.model import HookConf, PeerAddr, PythonConf, Source, UpstreamConf, UpstreamServerConf
from scriptlb.hooks import HookOutcome, HookRunner
from scriptlb.peers import PeerSet
from scriptlb.sandbox.guards import text_size
from scriptlb.sandbox.limits import MAX_STR

_OUTCOMES = {None: "ok", "no_peer": "ok", "runtime_error": "runtime_error", "exit_error": "runtime_error",
             "timeout": "timeout", "compile_error": "compile_error"}


class SyntheticExchange:
    """The exchange attributes hooks and variables read (docs/architecture.md), for one request."""

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]], peers: int,
                 last_failure: tuple[str, int] | None, tries_cap: int) -> None:
        self.method = method
        self.request_uri = target
        path, _, query = target.partition("?")
        self.uri = path or "/"
        self.args = query or None
        self.http_version = "1.1"
        self.headers = headers
        self.remote_addr, self.remote_port = "127.0.0.1", 40000
        self.server_addr, self.server_port, self.server_name = "127.0.0.1", 80, "localhost"
        self.host = (self.header("host") or "localhost").split(":")[0].lower()
        self.scheme = "http"
        self.start_time = time.time()
        self.status = self.body_bytes_sent = self.bytes_sent = self.request_length = 0
        self.conn_id, self.conn_requests = 1, 1
        self.upstream_name = "backend"
        self.upstream_headers: list[tuple[bytes, bytes]] = []
        self.response_headers = b""
        self.proxy_host = "backend"
        self.ctx: dict[str, Any] = {}
        self.connect_timeout = self.send_timeout = self.read_timeout = 60.0
        self.last_failure = last_failure
        self.tries: list[Any] = [object()] if last_failure else []  # one earlier try, if it failed
        self.tries_left = max(peers - len(self.tries), 1)
        self.tries_cap = tries_cap

    def header(self, name_lower: str) -> str | None:
        for name, value in self.headers:
            if name.decode("latin-1").lower() == name_lower:
                return value.decode("latin-1")
        return None


class SyntheticUpstream:
    """An upstream runtime with ``peers`` (and ``backup`` peers), as the hook API sees it."""

    def __init__(self, peers: list[PeerAddr], backup: list[PeerAddr] | None = None) -> None:
        servers = tuple(UpstreamServerConf(name=p.name, addrs=(p,)) for p in peers)
        servers += tuple(UpstreamServerConf(name=p.name, addrs=(p,), backup=True) for p in backup or [])
        self.name = "backend"
        self.conf = UpstreamConf(name="backend", servers=servers)
        self.peers = PeerSet.from_conf(self.conf)


def _peer(text: str) -> PeerAddr:
    host, _, port = text.strip().rpartition(":")
    return PeerAddr(host.strip("[]"), int(port))


def _header(text: str) -> tuple[bytes, bytes]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"header must be 'Name: value', got {text!r}")
    return name.strip().encode("latin-1"), value.strip().encode("latin-1")


def _last_failure(text: str) -> tuple[str, int]:
    state, _, status = text.partition(":")
    if state not in ("failed", "next") or not status.isdigit():
        raise argparse.ArgumentTypeError("--last-failure must be failed:STATUS or next:STATUS")
    return state, int(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptlb hook", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a balancer hook once and print one JSON line")
    run.add_argument("file")
    run.add_argument("--uri", default="/", help="request target, with ?args (default /)")
    run.add_argument("--method", default="GET")
    run.add_argument("--header", action="append", type=_header, default=[], help="'Name: value'")
    run.add_argument("--peers", default="127.0.0.1:8080", help="comma-separated ip:port list")
    run.add_argument("--backup-peers", default="", help="comma-separated ip:port list (backup)")
    run.add_argument("--last-failure", type=_last_failure, default=None, help="failed:502, next:404")
    run.add_argument("--tries-cap", type=int, default=0, help="proxy_next_upstream_tries (0: no cap)")
    run.add_argument("--timeout", type=float, default=10.0, help="CPU budget in ms (default 10)")
    run.add_argument("--package-path", default="", help="python_package_path, e.g. 'hooks/lib/?.py'")
    run.add_argument("--ctx", type=json.loads, default=None, help="initial ngx.ctx as JSON (a retry's state)")
    return parser


def run_hook(opts: argparse.Namespace) -> dict[str, Any]:
    """Run the hook described by parsed options; returns the JSON-ready result."""
    logs: list[str] = []
    path = os.path.abspath(opts.file)
    hook = HookConf(kind="file", path=path, code=None, source=Source(path, 0), timeout=opts.timeout / 1000)
    package_path = tuple(os.path.abspath(p) for p in opts.package_path.split(";") if p)
    peers = [_peer(p) for p in opts.peers.split(",") if p.strip()]
    upstream = SyntheticUpstream(peers, [_peer(p) for p in opts.backup_peers.split(",") if p.strip()])
    exchange = SyntheticExchange(opts.method, opts.uri, opts.header, len(peers), opts.last_failure,
                                 opts.tries_cap)
    if isinstance(opts.ctx, dict):
        exchange.ctx.update(opts.ctx)
    runner = HookRunner(hook, upstream, PythonConf(package_path=package_path),
                        log=lambda level, msg, _ex: logs.append(f"[{level}] {msg}"))
    outcome = runner.run(exchange, upstream)
    return _result(outcome, exchange, logs)


def _result(outcome: HookOutcome, exchange: SyntheticExchange, logs: list[str]) -> dict[str, Any]:
    kind = "exit" if outcome.exit_status is not None and outcome.error is None else _OUTCOMES[outcome.error]
    error = outcome.message
    if outcome.error == "no_peer":
        error = "no peer set: the try falls back to the upstream's balancer"
    return {
        "outcome": kind,
        "peer": outcome.addr.name if outcome.addr is not None else None,
        "host": outcome.host,
        "more_tries": outcome.more_tries,
        "timeouts": {"connect": exchange.connect_timeout, "send": exchange.send_timeout,
                     "read": exchange.read_timeout},
        "exit_status": outcome.exit_status,
        "keepalive": list(outcome.keepalive) if outcome.keepalive else None,
        "ctx": _plain(exchange.ctx),
        "logs": logs,
        "error": error,
    }


def _plain(value: Any) -> Any:
    """ngx.ctx as JSON: plain values as they are; anything else, or anything huge, abbreviated."""
    if text_size(value, MAX_STR) > MAX_STR:
        return short_text(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return short_text(value)
    return value


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    result = run_hook(opts)
    print(json.dumps(result, sort_keys=False))
    return 0 if result["outcome"] in ("ok", "exit") else 1

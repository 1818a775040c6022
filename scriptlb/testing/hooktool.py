"""``scriptlb hook run FILE ...``: run one hook under the real sandbox and limits, against a
synthetic request, and print what it decided as JSON (``scriptlb.testing.HookKit`` does the work).

    scriptlb hook run hooks/hash_by_uri.py --uri /a/b --header 'Cookie: id=7' \\
        --peers 127.0.0.1:9001,127.0.0.1:9002 --last-failure failed:502
    scriptlb hook run --conf conf/hooks/chash_by_header.conf --upstream backend --header 'X-User-Id: 7'
    scriptlb hook run hooks/fastest_first.py --phase log --var status=502 --var upstream_addr=127.0.0.1:9001
    scriptlb hook run hooks/retry_other_peer.py --tries 3 --fail 502 --fail timeout

Output (one balancer run): ``{"outcome": "ok"|"compile_error"|"runtime_error"|"timeout"|"exit", "peer": ...,
"host": ..., "more_tries": ..., "timeouts": {...}, "exit_status": ..., "logs": [...],
"error": ...}``; the exit status is 0 only for "ok" and "exit". A run that sets no peer is "ok"
with ``"peer": null`` (the proxy would fall back to the upstream's method) and says so in "error".
``--tries N`` walks a whole request instead: one line per try (who chose the peer, its status,
the hook's run), then ``{"status": ..., "tries": ...}``. ``--phase log``: ``{"outcome", "logs"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scriptlb.config import ConfigError
from scriptlb.testing.kit import HookKit

# what --var may set for a log run (HookKit.log's arguments)
LOG_VARS = ("status", "upstream_addr", "upstream_status", "upstream_response_time", "request_time")
# a walk's retries in a hook file's own config: what a newcomer's --fail means
WALK_NEXT_UPSTREAM = "proxy_next_upstream error timeout http_500 http_502 http_503 http_504;"


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"header must be 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _last_failure(text: str) -> tuple[str, int]:
    state, _, status = text.partition(":")
    if state not in ("failed", "next") or not status.isdigit():
        raise argparse.ArgumentTypeError("--last-failure must be failed:STATUS or next:STATUS")
    return state, int(status)


def _failure(text: str) -> int | str:
    if text in ("error", "timeout"):
        return text
    if text.isdigit() and 100 <= int(text) <= 999:
        return int(text)
    raise argparse.ArgumentTypeError(f"--fail takes a status, error or timeout, not {text!r}")


def _var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or name not in LOG_VARS:
        raise argparse.ArgumentTypeError(f"--var takes NAME=VALUE with NAME one of {', '.join(LOG_VARS)}")
    return name, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptlb hook", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a hook once (or walk a request's tries) and print JSON")
    run.add_argument("file", nargs="?", help="the hook file (or give --conf)")
    run.add_argument("--conf", help="a config: run its upstream's hook (_file or _block) with its settings")
    run.add_argument("--upstream", help="the upstream of --conf (default: the one with a hook)")
    run.add_argument("--phase", choices=("balancer", "log"), default="balancer")
    run.add_argument("--uri", default="/", help="request target, with ?args (default /)")
    run.add_argument("--method", default="GET")
    run.add_argument("--header", action="append", type=_header, default=[], help="'Name: value'")
    run.add_argument("--remote-addr", default="127.0.0.1", help="the client's address ($remote_addr)")
    run.add_argument("--peers", default="127.0.0.1:8080", help="comma-separated ip:port list")
    run.add_argument("--backup-peers", default="", help="comma-separated ip:port list (backup)")
    run.add_argument("--last-failure", type=_last_failure, default=None, help="failed:502, next:404")
    run.add_argument("--tries-cap", type=int, default=None, help="proxy_next_upstream_tries (0: no cap)")
    run.add_argument("--timeout", type=float, default=10.0, help="CPU budget in ms (default 10)")
    run.add_argument("--package-path", default="", help="python_package_path, e.g. 'hooks/lib/?.py'")
    run.add_argument("--ctx", type=json.loads, default=None, help="initial ngx.ctx as JSON (a retry's state)")
    run.add_argument(
        "--var",
        action="append",
        type=_var,
        default=[],
        help=f"--phase log: a variable of the finished request ({', '.join(LOG_VARS)})",
    )
    run.add_argument("--tries", type=int, default=None, help="walk a whole request of at most N tries")
    run.add_argument(
        "--fail",
        action="append",
        type=_failure,
        default=[],
        help="with --tries: the next try fails so (502, error, timeout); repeat per try",
    )
    return parser


def _kit(opts: argparse.Namespace) -> HookKit:
    if opts.conf:
        return HookKit.from_conf(opts.conf, opts.upstream)
    peers = [p.strip() for p in opts.peers.split(",") if p.strip()]
    backup = [p.strip() for p in opts.backup_peers.split(",") if p.strip()]
    return HookKit.from_file(
        opts.file,
        peers=peers,
        backup=backup,
        phase=opts.phase,
        timeout_ms=opts.timeout,
        package_path=[p for p in opts.package_path.split(";") if p],
        proxy=WALK_NEXT_UPSTREAM if opts.tries else "",
    )


def run_hook(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Run what the options describe; the JSON-ready lines to print (one unless --tries)."""
    headers = opts.header
    with _kit(opts) as kit:
        if opts.phase == "log":
            variables = dict(opts.var)
            log = kit.log(
                opts.uri,
                method=opts.method,
                headers=headers,
                remote_addr=opts.remote_addr,
                status=int(variables.pop("status", 200)),
                request_time=float(variables.pop("request_time", 0.0)),
                ctx=opts.ctx,
                **variables,
            )
            return [{"outcome": log.outcome, "logs": log.logs}]
        if opts.tries:
            walk = kit.request(
                opts.uri,
                method=opts.method,
                headers=headers,
                remote_addr=opts.remote_addr,
                fail=opts.fail,
                tries_cap=opts.tries,
            )
            lines: list[dict[str, Any]] = [{"try": i, **t.as_dict()} for i, t in enumerate(walk.tries, 1)]
            return [*lines, {"status": walk.status, "tries": len(walk.tries)}]
        result = kit.run(
            opts.uri,
            method=opts.method,
            headers=headers,
            remote_addr=opts.remote_addr,
            last_failure=opts.last_failure,
            ctx=opts.ctx if isinstance(opts.ctx, dict) else None,
            tries_cap=opts.tries_cap,
        )
        return [result.as_dict()]


def _succeeded(lines: list[dict[str, Any]]) -> bool:
    outcomes = [line["outcome"] for line in lines if "outcome" in line]
    outcomes += [line["hook"]["outcome"] for line in lines if line.get("hook")]
    return all(outcome in ("ok", "exit") for outcome in outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not opts.file and not opts.conf:
        parser.error("a hook FILE or --conf is required")
    if opts.file and opts.conf:
        parser.error("give a hook FILE or --conf, not both")
    try:
        lines = run_hook(opts)
    except (ConfigError, ValueError, RuntimeError) as err:
        sys.stderr.write(f"scriptlb hook: {str(err).removeprefix('[emerg] ')}\n")
        return 1
    for line in lines:
        print(json.dumps(line, sort_keys=False))
    return 0 if _succeeded(lines) else 1

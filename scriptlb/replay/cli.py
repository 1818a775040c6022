"""``scriptlb replay --conf FILE [options] LOG...``: the command line of the replay.

Prints a table (and writes ``--json``, ``--plot``, ``--decisions``); exit status 0, or 1 with
a one-line reason for a config, log format or model that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from scriptlb.config import ConfigError
from scriptlb.replay.logs import LogFormatError
from scriptlb.replay.model import ModelError
from scriptlb.replay.report import moved, plot, summary, table
from scriptlb.replay.run import Options, progress_bar, replay


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scriptlb replay",
        description="Replay recorded traffic through a config's hook (or balancing method) in virtual time.",
    )
    parser.add_argument(
        "logs", nargs="+", metavar="LOG", help="access logs ('-': standard input, .gz read as is)"
    )
    parser.add_argument("--conf", required=True, help="the scriptlb/nginx config under test")
    parser.add_argument("-p", "--prefix", help="the prefix its relative paths are under (default: .)")
    parser.add_argument(
        "--upstream", help="the upstream to replay (default: the one with a hook, or the only one)"
    )
    parser.add_argument(
        "--log-format", help="a log_format name of --conf, or a format string (default: combined)"
    )
    parser.add_argument("--model", help="peer model overrides (YAML, JSON or TOML)")
    parser.add_argument("--compare", metavar="OTHER_CONF", help="replay a second config on the same trace")
    parser.add_argument("--rate", type=float, help="arrivals per second instead of the recorded times")
    parser.add_argument(
        "--seed", type=int, default=1, help="random seed of the model and methods (default 1)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON ('-': standard output)")
    parser.add_argument(
        "--plot", metavar="OUT_PNG", help="plot shares and latency over time (needs matplotlib)"
    )
    parser.add_argument("--decisions", metavar="OUT", help="write every request's peers, one JSON line each")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = Options(
        conf=args.conf,
        logs=list(args.logs),
        upstream=args.upstream,
        log_format=args.log_format,
        model=args.model,
        prefix=args.prefix,
        compare=args.compare,
        rate=args.rate,
        seed=args.seed,
        decisions=bool(args.decisions),
        progress=None if args.quiet or not sys.stderr.isatty() else progress_bar(),
    )
    try:
        results, trace, seconds = replay(options)
    except (ConfigError, LogFormatError, ModelError, ValueError, OSError) as err:
        sys.stderr.write(f"scriptlb replay: {str(err).removeprefix('[emerg] ')}\n")
        return 1
    if trace.requests == 0:
        sys.stderr.write(
            f"scriptlb replay: no request found in {trace.lines} lines (is --log-format the logs' format?)\n"
        )
        return 1
    if trace.latency_samples == 0 and not args.model:
        sys.stderr.write(
            "scriptlb replay: warning: the log records no $upstream_addr/$upstream_response_time: "
            "every try takes no time (give the peers' latency with --model)\n"
        )
    summaries = [summary(r) for r in results]
    out: dict[str, Any] = {
        "requests": trace.requests,
        "lines": trace.lines,
        "skipped_lines": trace.skipped,
        "trace_seconds": round(trace.last - trace.first, 3),
        "replay_seconds": round(seconds, 3),
        "results": summaries,
    }
    if len(results) == 2:
        out["moved_requests"] = moved(results[0], results[1])
    # the files first: a reader of the table that goes away (`| head`) must not lose them
    if args.json:
        _write(args.json, json.dumps(out, indent=2) + "\n")
    if args.decisions:
        _write(args.decisions, "".join(_decision_lines(results)))
    if args.plot:
        try:
            plot(results, args.plot)
        except RuntimeError as err:
            sys.stderr.write(f"scriptlb replay: {err}\n")
            return 1
    try:
        print(table(summaries))
        if len(results) == 2:
            print(f"requests whose first peer differs: {out['moved_requests']}")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    if not args.quiet:
        sys.stderr.write(
            f"{trace.requests} requests in {seconds:.2f} s "
            f"({trace.requests * len(results) / max(seconds, 1e-9):,.0f} simulated requests/s)"
            f"{f', {trace.skipped} lines skipped' if trace.skipped else ''}\n"
        )
    return 0


def _decision_lines(results: list[Any]) -> list[str]:
    lines = []
    for number, result in enumerate(results):
        names = result.peer_names
        for line, peers in zip(result.lines, result.decisions or [], strict=True):
            lines.append(
                json.dumps({"config": number, "line": line, "peers": [names[i] for i in peers]}) + "\n"
            )
    return lines


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

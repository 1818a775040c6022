"""Python bytecodes per proxied request, by function: where bench/instructions.py's count goes.

    .venv/bin/python bench/bytecodes.py [--low 100] [--high 400] [--conf-extra "python_peer_stats off;"]
                                        [--hook | --hook-module] [--peers N]

Runs one scriptlb worker (``master_process off``, the config of bench/instructions.py) under a
``sys.settrace`` hook that counts the bytecodes each Python function executes (opcode events),
sends ``--low`` and then ``--high`` sequential keep-alive requests, and prints the difference per
request: the functions a proxied request runs, how many times over, and the bytecodes of each.
Deterministic (no timing), so a change that removes a call or a few bytecodes shows exactly;
it says nothing of C code (llhttp, uvloop, allocation): bench/instructions.py counts those.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import pickle
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_proc  # noqa: E402
import instructions  # noqa: E402

Key = tuple[str, str, int]  # (file below scriptlb/, function, first line)


def traced_main(out: str, args: list[str]) -> int:
    """Run scriptlb with every Python frame's bytecodes counted; the counts go to ``out``."""
    counts: collections.Counter[Key] = collections.Counter()

    def local(frame: FrameType, event: str, _arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename.split("/scriptlb/")[-1], code.co_name, code.co_firstlineno)] += 1
        return local

    def on_call(frame: FrameType, _event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    def dump() -> None:
        sys.settrace(None)
        Path(out).write_bytes(pickle.dumps(dict(counts)))

    atexit.register(dump)
    sys.argv = ["scriptlb", *args]
    from scriptlb.cli import main as scriptlb_main

    sys.settrace(on_call)
    return scriptlb_main()


def run(procs: bench_proc.Procs, work: Path, conf: str, port: int, count: int) -> dict[Key, int]:
    """The bytecode counts of one worker's life that served ``count`` requests."""
    prefix = work / f"p{count}"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "scriptlb.conf").write_text(conf)
    out = prefix / "bytecodes.pickle"
    proc = procs.start(f"traced-{count}", [sys.executable, str(Path(__file__)), "--traced", str(out), "--",
                                           "-p", str(prefix), "-c", str(prefix / "scriptlb.conf")],
                       cwd=str(HERE.parent))
    if not bench_proc.wait_port(port, proc, timeout=120):
        raise SystemExit(f"scriptlb did not start:\n{proc.log_tail()}")
    instructions.send(port, count)
    procs.stop(proc, timeout=120)
    counts: dict[Key, int] = pickle.loads(out.read_bytes())
    return counts


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        return traced_main(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low", type=int, default=100)
    parser.add_argument("--high", type=int, default=400)
    parser.add_argument("--conf-extra", default="python_peer_stats off;",
                        help="http-level directives added to the proxy's config")
    parser.add_argument("--hook", action="store_true",
                        help="the upstream picks its peer with bench/run.py's crc32 hook, as ported "
                             "from OpenResty (keepalive N pools it, no enable_keepalive)")
    parser.add_argument("--hook-module", action="store_true",
                        help="the same hook importing its pick from a module on python_package_path")
    parser.add_argument("--peers", type=int, default=1,
                        help="servers in the round robin upstream (default 1, nginx's single peer; "
                             "make bench's has 4)")
    parser.add_argument("--min", type=float, default=3.0,
                        help="list the functions with at least this many bytecodes per request")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scriptlb-bytecodes-") as tmp:
        work = Path(tmp)
        procs = bench_proc.Procs(work / "logs")
        bench_proc.install_cleanup(procs)
        try:
            backend_port, = bench_proc.free_ports(1)
            backend = work / "backend"
            backend.mkdir()
            (backend / "b.conf").write_text(instructions.backend_conf(backend, backend_port))
            procs.start("backend", [sys.executable, "-m", "scriptlb", "-p", str(backend),
                                    "-c", str(backend / "b.conf")], cwd=str(HERE.parent))
            if not bench_proc.wait_port(backend_port, None, timeout=30):
                raise SystemExit("the backend did not start")
            results = []
            for count in (opts.low, opts.high):
                port, = bench_proc.free_ports(1)
                style = "module" if opts.hook_module else "ported" if opts.hook else ""
                conf = instructions.hook_conf(work / f"p{count}", port, backend_port, style, opts.conf_extra,
                                              peers=opts.peers)
                results.append(run(procs, work, conf, port, count))
        finally:
            procs.stop_all()
    low, high = results
    span = opts.high - opts.low
    rows = sorted(((count - low.get(key, 0)) / span, key) for key, count in high.items())
    total = sum(per for per, _ in rows)
    functions = sum(1 for per, _ in rows if per >= 0.5)
    print(f"{total:,.0f} bytecodes per request in {functions} Python functions")
    for per, (file, name, line) in reversed(rows):
        if per >= opts.min:
            print(f"{per:8.1f}  {name} ({file}:{line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Instructions per proxied request, counted by valgrind (callgrind): a noise-free A/B.

    .venv/bin/python bench/instructions.py [--low 200] [--high 1200]
                                           [--metrics | --sync | --trace | --tls | --hook | --hook-module]
                                           [--peers N]

Wall-clock A/Bs on a shared or virtual machine wander by more than the few percent some
features cost (the peer statistics' budget is 3%). Instruction counts do not: this
script runs one scriptlb worker (``master_process off``) under callgrind for each config,
sends ``--low`` and then ``--high`` sequential keep-alive requests through it to a backend
outside valgrind, and reports ``(count(high) - count(low)) / (high - low)``: the user-mode
instructions of one request, start-up and shutdown cancelled out.

Configs compared: ``python_peer_stats on`` (the default) against ``off``. Kernel work (about 40%
of the proxy's CPU per request in bench/run.py) is not counted, and an instruction is not a
cycle: treat the difference as an upper bound of the CPU cost, and the wall-clock micro-cost
(also printed) as the estimate. Needs valgrind (``apt-get install valgrind``); about a minute.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_proc  # noqa: E402

CONFIGS = {"python_peer_stats on": "", "python_peer_stats off": "python_peer_stats off;"}
# --metrics: the same proxy with everything the metrics count switched on (a status_zone on the
# server, a prometheus location; the per-peer counters are on in both runs)
METRICS_CONFIGS = {"metrics off": "", "metrics on": "status_zone front; location = /metrics { prometheus; }"}
# --trace: balancer_trace_header on in the proxied location, for a client that does not ask for
# the header (every response is checked for a peer's own X-Balancer-Trace and for the question)
TRACE_CONFIGS = {"trace header off": "",
                 "trace header on": "balancer_trace_header on; balancer_trace_allow 127.0.0.1;"}


# --tls: the same proxy with its listen terminating TLS (a trustme certificate), the client on
# HTTPS keep-alive: the difference is what TLS costs per request in user mode
TLS_CONFIGS = {"plain HTTP": "", "HTTPS": " ssl"}


# --hook: round robin against bench/run.py's crc32 hook as ported from OpenResty (scriptlb-hook-ported:
# `keepalive N` pools the hook's peers, no enable_keepalive, the code inline); --hook-module: that
# inline hook against the same pick imported from a module on python_package_path
# (scriptlb-hook-module), the ratio the issue holds within 5%
HOOK_CONFIGS = {"round robin": "", "hook inline": "ported"}
HOOK_MODULE_CONFIGS = {"hook inline": "ported", "hook module": "module"}


# the comparisons printed as "what: +N instructions per request": option, what, the config
# labels with and without it (the default, statistics on/off, when no option is given)
DIFFERENCES = (
    ("sync", "shared dict sync", "sync on", "sync off"),
    ("metrics", "metrics", "metrics on", "metrics off"),
    ("tls", "TLS", "HTTPS", "plain HTTP"),
    ("hook", "crc32 hook", "hook inline", "round robin"),
    ("trace", "trace header", "trace header on", "trace header off"),
)


def hook_conf(prefix: Path, listen: int, backend: int, style: str, extra: str = "", peers: int = 1) -> str:
    """proxy_conf with bench/bench_conf.py's crc32 hook in the upstream ("" = none): "ported" inline,
    or "module" (writes ``prefix``/lib/picker.py and points python_package_path at it). ``peers``
    is proxy_conf's, for round robin (a hook picks between two addresses whatever it is)."""
    import bench_conf

    ports = [backend, backend]  # two "peers" on the one backend: the hook's modulo still picks
    if style == "module":
        (prefix / "lib").mkdir(parents=True, exist_ok=True)
        (prefix / "lib" / f"{bench_conf.PICKER_MODULE}.py").write_text(bench_conf.picker_module(ports))
        code = bench_conf.python_module_hook()
        extra += f' python_package_path "{prefix}/lib/?.py";'
    elif style == "ported":
        code = bench_conf.python_hook(ports, keepalive=False)
    else:
        return proxy_conf(prefix, listen, backend, extra, peers=peers)
    conf = proxy_conf(prefix, listen, backend, extra)
    marker = "keepalive 16; }"
    return conf.replace(marker, "keepalive 16;\n    balancer_by_python_block {\n" + code + "    }\n  }", 1)


def proxy_conf(prefix: Path, listen: int, backend: int, extra: str, server_extra: str = "",
               listen_params: str = "", peers: int = 1) -> str:
    """``peers``: how many servers the upstream has (the same backend each time: round robin
    chooses among them as among distinct ones; one is nginx's single peer, nothing to choose)."""
    servers = f"server 127.0.0.1:{backend}; " * peers
    return (
        f"daemon off; master_process off; error_log {prefix}/error.log error; pid {prefix}/pid;\n"
        "events {}\n"
        f"http {{ access_log off; {extra}\n"
        f"  upstream b {{ {servers}keepalive 16; }}\n"
        f"  server {{ listen 127.0.0.1:{listen}{listen_params}; {server_extra}\n"
        '    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }\n'
        "  }\n}\n"
    )


# --sync: a hook reading and counting in a shared dict on every request, the dict plain or merged
# with a local Redis (python_shared_dict ... sync=); the worker's instructions only, not the
# cluster process's, which merges in the background whatever the request rate
SYNC_CONFIGS = {"sync off": "", "sync on": " sync=redis://127.0.0.1:{redis}/0"}
SYNC_HOOKS = {
    "count": 'balancer_by_python_block { d = ngx.shared.d; d.get("seen"); d.incr("hits", 1, 0, 60) }',
    "read": 'balancer_by_python_block { d = ngx.shared.d; d.get("seen"); d.get("hits") }',
}


def sync_conf(prefix: Path, listen: int, backend: int, sync: str, hook: str = "count") -> str:
    return (
        f"daemon off; worker_processes 1; error_log {prefix}/error.log error; pid {prefix}/pid;\n"
        "events {}\n"
        f"http {{ access_log off; python_shared_dict d 1m{sync};\n"
        f"  upstream b {{ server 127.0.0.1:{backend}; keepalive 16; {SYNC_HOOKS[hook]} }}\n"
        f"  server {{ listen 127.0.0.1:{listen};\n"
        '    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }\n'
        "  }\n}\n"
    )


def worker_instructions(out: Path, master_pid: int) -> int:
    """With a master: callgrind writes one file per process (``out.PID``); the worker is the
    master's first child (the cluster process, when there is one, is forked after it)."""
    children = sorted((int(f.name.rsplit(".", 1)[1]), f) for f in out.parent.glob(out.name + ".*")
                      if int(f.name.rsplit(".", 1)[1]) != master_pid)
    if not children:
        raise SystemExit(f"no worker output beside {out}")
    return _totals(children[0][1])


def _totals(path: Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
    if match is None:
        raise SystemExit(f"no totals in {path}")
    return int(match.group(1))


def backend_conf(prefix: Path, listen: int) -> str:
    return (f"daemon off; master_process off; error_log {prefix}/error.log error; events {{}}\n"
            f'http {{ access_log off; server {{ listen 127.0.0.1:{listen}; return 200 "ok"; }} }}\n')


def tls_files(work: Path) -> str:
    """ssl_certificate lines of a certificate made for the run."""
    import trustme

    cert = trustme.CA().issue_cert("bench.test")
    cert.cert_chain_pems[0].write_to_path(work / "cert.pem")
    cert.private_key_pem.write_to_path(work / "key.pem")
    return f"ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem;"


def send(port: int, count: int, tls: bool = False) -> None:
    if tls:
        import ssl

        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=120,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            if response.read() != b"ok":
                raise SystemExit(f"unexpected answer {response.status}")
    finally:
        conn.close()


def instructions(procs: bench_proc.Procs, work: Path, name: str, conf: str, port: int, count: int,
                 master: bool = False, tls: bool = False) -> int:
    """Total instructions of one worker's life that served ``count`` requests (+1 probe)."""
    prefix = work / name
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "scriptlb.conf").write_text(conf)
    out = prefix / "callgrind.out"
    pattern = f"{out}.%p" if master else str(out)
    # a fixed hash seed: string hashes decide how many probes each dict lookup takes, and a
    # random seed moves the count by ~2k instructions between runs of the same code
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = procs.start(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={pattern}",
                              sys.executable, "-m", "scriptlb", "-p", str(prefix), "-c",
                              str(prefix / "scriptlb.conf")], cwd=str(HERE.parent), env=env)
    if not bench_proc.wait_port(port, proc, timeout=300):
        raise SystemExit(f"{name} did not start:\n{proc.log_tail()}")
    send(port, 1 + count, tls)
    procs.stop(proc, timeout=300)  # TERM: the worker exits and callgrind writes its totals
    if master:
        return worker_instructions(out, proc.pid)
    return _totals(out)


def wall_micro_us() -> float:
    """The statistics' per-request work alone (weight check, start, finish with a sample; the
    batched publishing, 20 times a second per busy peer, is not included),
    best of 7 x 200k, in microseconds."""
    import asyncio
    import timeit

    from scriptlb.config import load
    from scriptlb.request.runtime import UpstreamRuntime
    from scriptlb.state.stats import WEIGHT_GENERATION, PeerStats, Recorder, layout_of

    with tempfile.TemporaryDirectory() as tmp:
        conf_file = Path(tmp) / "s.conf"
        conf_file.write_text("events {} http { upstream b { server 127.0.0.1:1; server 127.0.0.1:2; }\n"
                             "server { listen 127.0.0.1:1; location / { proxy_pass http://b; } } }\n")
        http = load(str(conf_file), tmp).http
        assert http is not None
        stats = PeerStats.open(tmp, layout_of(http))
        loop = asyncio.new_event_loop()
        recorder = Recorder(stats, loop)
        upstream = UpstreamRuntime(http.upstreams["b"], loop, None, recorder)
        peer = upstream.peers.primary[1]

        def per_request() -> None:
            ustats = upstream.stats
            if ustats is not None and ustats.words[WEIGHT_GENERATION] != ustats.generation:
                upstream.refresh_weights()
            if ustats is not None:
                ustats.start(peer.stats_index)
                ustats.finish(peer.stats_index, 200, 0.0012, False)

        runs = 200_000
        best = min(timeit.repeat(per_request, number=runs, repeat=7)) / runs
        recorder.flush()  # (its loop never ran: the flush a worker's timer would do)
        loop.close()
        stats.close()
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low", type=int, default=200)
    parser.add_argument("--high", type=int, default=1200)
    parser.add_argument("--metrics", action="store_true", help="compare metrics on/off instead")
    parser.add_argument("--sync", action="store_true",
                        help="compare a shared dict hook with python_shared_dict sync= on/off instead")
    parser.add_argument("--sync-hook", choices=sorted(SYNC_HOOKS), default="count",
                        help="--sync: the hook reads and counts (get + incr) or only reads (2 gets)")
    parser.add_argument("--trace", action="store_true", help="compare balancer_trace_header off/on instead")
    parser.add_argument("--tls", action="store_true", help="compare plain HTTP and HTTPS keep-alive instead")
    parser.add_argument("--hook", action="store_true",
                        help="compare round robin and the crc32 hook as ported (keepalive N, inline)")
    parser.add_argument("--hook-module", action="store_true",
                        help="compare the inline crc32 hook and the same pick imported from a module")
    parser.add_argument("--peers", type=int, default=1,
                        help="servers in the round robin upstream (default 1, nginx's single peer; "
                             "make bench's upstream has 4)")
    opts = parser.parse_args()
    hooked = opts.hook or opts.hook_module
    configs = (METRICS_CONFIGS if opts.metrics else SYNC_CONFIGS if opts.sync
               else TRACE_CONFIGS if opts.trace else TLS_CONFIGS if opts.tls
               else HOOK_CONFIGS if opts.hook else HOOK_MODULE_CONFIGS if opts.hook_module else CONFIGS)
    if opts.sync and shutil.which("redis-server") is None:
        print("redis-server is missing: bash scripts/install-test-tools", file=sys.stderr)
        return 1
    if shutil.which("valgrind") is None:
        print("valgrind is missing: apt-get install valgrind", file=sys.stderr)
        return 1
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scriptlb-instr-") as tmp:
        work = Path(tmp)
        procs = bench_proc.Procs(work / "logs")
        bench_proc.install_cleanup(procs)
        try:
            backend_port, = bench_proc.free_ports(1)
            (work / "backend").mkdir()
            (work / "backend" / "b.conf").write_text(backend_conf(work / "backend", backend_port))
            backend = procs.start("backend", [sys.executable, "-m", "scriptlb", "-p", str(work / "backend"),
                                              "-c", str(work / "backend" / "b.conf")], cwd=str(HERE.parent))
            if not bench_proc.wait_port(backend_port, backend):
                raise SystemExit(f"backend did not start:\n{backend.log_tail()}")
            redis_port, = bench_proc.free_ports(1)
            if opts.sync:
                redis = procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                              "127.0.0.1", "--save", "", "--appendonly", "no"], cwd=tmp)
                if not bench_proc.wait_port(redis_port, redis):
                    raise SystemExit(f"redis-server did not start:\n{redis.log_tail()}")
            for label, extra in configs.items():
                counts = []
                for count in (opts.low, opts.high):
                    port, = bench_proc.free_ports(1)
                    prefix = work / f"{label}-{count}".replace(" ", "_")
                    if opts.sync:
                        conf = sync_conf(prefix, port, backend_port, extra.format(redis=redis_port),
                                         opts.sync_hook)
                    elif opts.metrics:
                        conf = proxy_conf(prefix, port, backend_port, "", extra)
                    elif hooked:
                        conf = hook_conf(prefix, port, backend_port, extra, "python_peer_stats off;")
                    elif opts.tls:
                        certificate = tls_files(work) if extra else ""
                        conf = proxy_conf(prefix, port, backend_port, "", certificate, extra)
                    else:
                        conf = proxy_conf(prefix, port, backend_port, extra, peers=opts.peers)
                    name = f"{label}-{count}".replace(" ", "_")
                    counts.append(instructions(procs, work, name, conf, port, count, master=opts.sync,
                                               tls=bool(opts.tls and extra)))
                per_request[label] = (counts[1] - counts[0]) / (opts.high - opts.low)
                print(f"{label:24s} {per_request[label]:10,.0f} instructions per request", flush=True)
        finally:
            procs.stop_all()
    if opts.hook_module:
        module, inline = per_request["hook module"], per_request["hook inline"]
        print(f"module hook / inline hook: {module / inline:.3f} ({module - inline:+,.0f} instructions "
              "per request, user mode)")
        return 0
    compared = next(((what, on, off) for flag, what, on, off in DIFFERENCES if getattr(opts, flag)),
                    ("peer statistics", "python_peer_stats on", "python_peer_stats off"))
    what, on_label, off_label = compared
    on, off = per_request[on_label], per_request[off_label]
    print(f"{what}: {on - off:+,.0f} instructions per request ({on / off - 1:+.1%}, user mode)")
    if not any(getattr(opts, flag) for flag, *_ in DIFFERENCES):
        print(f"peer statistics, wall-clock micro-cost: {wall_micro_us():.2f} us per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: scriptlb beside nginx, nginx + balancer_by_lua and HAProxy, in one run.

    python bench/run.py [--quick] [--duration S] [--targets a,b] [--out DIR] [--profile]
    make bench ARGS=--quick

Four nginx backends (1 worker) serve ``/`` (small body) and ``/big`` (64 KiB). Each proxy runs
with 1 worker (scriptlb-2w: 2) and upstream keep-alive, pinned with taskset to the first CPU
(scriptlb-2w: the first two); wrk, the backends and this harness share the second CPU. Each
measured wrk run follows a warm-up run; repetitions are interleaved (A B C ... A B C ...) and
the medians reported. Results go to ``bench/results/bench.{md,json,png}`` (git-ignored).

A target whose software is missing is reported as ``missing: <what>`` and the others still run.
Every process the harness starts is stopped at the end, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_conf  # noqa: E402
import bench_cprofile  # noqa: E402
import bench_deps  # noqa: E402
import bench_load  # noqa: E402
import bench_proc  # noqa: E402
import bench_profile  # noqa: E402
import bench_report  # noqa: E402

NOISY_PCT = 15  # other work on the proxy's core above this: the run is repeated once
QUICK = {"duration": 2, "warmup": 1, "reps": 2, "paths": ["/"], "idle": 2000, "budget": 110}
DEFAULT = {"duration": 5, "warmup": 1, "reps": 4, "paths": ["/", "/big"], "idle": 10000, "budget": 560}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 2 minutes)")
    ap.add_argument("--duration", type=int, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=int, help="seconds of warm-up before each measured run")
    ap.add_argument("--reps", type=int, help="interleaved repetitions per target and path")
    ap.add_argument("--targets", help="comma-separated subset of: " + ",".join(bench_conf.TARGET_NAMES)
                    + " (default: all but the optional " + ", ".join(bench_conf.OPTIONAL_TARGETS) + ")")
    ap.add_argument("--paths", help="comma-separated URIs to load (default: / and /big; --quick: /)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--idle-conns", type=int, help="idle keep-alive connections to open (default 10000)")
    ap.add_argument("--overload-connections", type=int, default=1000,
                    help="the high-concurrency run: wrk connections on / and /big for nginx, HAProxy "
                    "and scriptlb, reporting p99 and errors (default 1000; 0: skip)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory (default bench/results)")
    ap.add_argument("--loadgen", choices=("wrk", "python"), default="wrk",
                    help="load generator; python is the bounded asyncio fallback used when wrk is missing")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install what is missing")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the scriptlb targets under load with py-spy (installed with pip)")
    ap.add_argument("--profile-seconds", type=int, default=8)
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native (C frames too; it stops the process per sample, which "
                    "seems to over-weight syscalls: compare with the kernel share from /proc)")
    return ap.parse_args(argv)


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        base = QUICK if args.quick else DEFAULT
        self.duration = args.duration or base["duration"]
        self.warmup = args.warmup if args.warmup is not None else base["warmup"]
        self.reps = args.reps or base["reps"]
        self.paths = args.paths.split(",") if args.paths else list(base["paths"])
        self.idle_n = args.idle_conns if args.idle_conns is not None else base["idle"]
        self.budget = base["budget"]
        names = args.targets.split(",") if args.targets else list(bench_conf.DEFAULT_TARGETS)
        self.targets = [bench_conf.target(n.strip()) for n in names if n.strip()]
        self.out = Path(args.out)
        self.work = self.out / "work"
        self.procs = bench_proc.Procs(self.work / "logs")
        self.t0 = time.monotonic()
        self.notes: list[str] = []
        self.fig: dict = {"targets": {}}
        self.live: dict[str, tuple[bench_proc.Proc, int]] = {}
        self.loadgen = "wrk"
        self.reruns = 0
        self.balancer_keepalive: int | None = bench_conf.UPSTREAM_KEEPALIVE  # None: scriptlb lacks it
        self.quiet_waited = 0.0
        self.retries_left = 3 if args.quick else 12
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = cpus
        if len(cpus) >= 2:
            self.proxy_cpu = str(cpus[0])
            self.load_cpu = str(cpus[1])
            self.wide_cpus = f"{cpus[0]},{cpus[2] if len(cpus) > 2 else cpus[1]}"
            self.pinning = (f"each 1-worker proxy pinned to CPU {self.proxy_cpu}; scriptlb-2w to CPUs "
                            f"{self.wide_cpus}; wrk, the 4 backends and the harness pinned to CPU "
                            f"{self.load_cpu} (taskset)")
        else:
            self.proxy_cpu = self.load_cpu = self.wide_cpus = None
            self.pinning = "not pinned: only one CPU available (proxy, wrk and backends share it)"

    # ------------------------------------------------------------------ helpers

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def cpus_for(self, t: bench_conf.Target) -> str | None:
        return self.wide_cpus if t.workers > 1 else self.proxy_cpu

    def tfig(self, name: str) -> dict:
        t = bench_conf.target(name)
        return self.fig["targets"].setdefault(
            name, {"label": t.label, "workers": t.workers, "cpus": self.cpus_for(t), "status": "ok",
                   "paths": {}})

    def fail(self, name: str, status: str) -> None:
        self.tfig(name)["status"] = status
        log(f"{name}: {status}")

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        if self.load_cpu is not None:
            os.sched_setaffinity(0, {int(self.load_cpu)})
        bench_proc.raise_nofile()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        log("checking dependencies" + ("" if self.args.no_install else " (installing what is missing)"))
        self.deps = bench_deps.ensure(install=not self.args.no_install, want_pyspy=self.args.profile)
        self.notes += self.deps.notes
        if not self.deps.taskset and self.load_cpu is not None:
            self.notes.append("taskset missing (util-linux): processes not pinned")
            self.pinning = "not pinned: taskset missing"
        self.fig["meta"] = self.meta()
        self.fig["pinning"] = self.pinning
        self.fig["settings"] = {
            "duration": self.duration, "warmup": self.warmup, "reps": self.reps, "paths": self.paths,
            "connections": self.args.connections, "threads": 1, "idle_conns": self.idle_n,
            "quick": self.args.quick, "loadgen": "wrk",
        }
        self.status_port: int | None = None
        if not self.deps.wrk or self.args.loadgen == "python":
            self.loadgen = "python"
            self.fig["settings"]["loadgen"] = "python fallback (figures not comparable with wrk's)"
            if not self.deps.wrk:
                self.notes.append(self.deps.missing("wrk") + "; used the Python fallback load generator")

    def meta(self) -> dict:
        def version(argv: list[str]) -> str:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
                return (p.stdout + p.stderr).strip().splitlines()[0]
            except (OSError, subprocess.TimeoutExpired, IndexError):
                return "missing"

        commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        cmd = "python bench/run.py " + " ".join(sys.argv[1:])
        return {
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.node()} ({platform.machine()}, Linux {platform.release()})",
            "cpus": os.cpu_count(), "command": cmd.strip(), "scriptlb_commit": commit,
            "python": platform.python_version(),
            "nginx": version([self.deps.nginx, "-v"]) if self.deps.nginx else "missing",
            "haproxy": version([self.deps.haproxy, "-v"]) if self.deps.haproxy else "missing",
            "wrk": version([self.deps.wrk, "-v"]) if self.deps.wrk else "missing",
        }

    def start_backends(self) -> bool:
        if not self.deps.nginx:
            self.notes.append("backends need nginx: " + self.deps.missing("nginx"))
            return False
        *self.backend_ports, self.status_port = bench_proc.free_ports(5)
        prefix = str(self.work / "backends")
        conf = bench_conf.write_backends(prefix, self.backend_ports, self.status_port)
        proc = self.procs.start("backends", [self.deps.nginx, "-p", prefix, "-c", conf, "-e",
                                             f"{prefix}/logs/error.log"], cpus=self.load_cpu)
        for p in self.backend_ports:
            if not bench_proc.wait_port(p, proc):
                self.notes.append(f"backends did not start: {proc.log_tail()}")
                return False
        status, _, body = bench_proc.http_get(self.backend_ports[0], "/big")
        if status != 200 or len(body) != bench_conf.BIG_SIZE:
            self.notes.append(f"backend /big check failed: {status}, {len(body)} bytes")
            return False
        log(f"backends up on {self.backend_ports}")
        return True

    def config_test(self, t: bench_conf.Target, prefix: str, conf: str) -> str | None:
        """None if the target's own config check passes, else the error text."""
        if t.kind == "floor":
            return None
        if t.kind == "nginx":
            argv = [self.deps.nginx, "-t", "-p", prefix, "-c", conf, "-e", f"{prefix}/logs/error.log"]
        elif t.kind == "haproxy":
            argv = [self.deps.haproxy, "-c", "-f", conf]
        else:
            argv = [sys.executable, "-m", "scriptlb", "-t", "-p", prefix, "-c", conf]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
        except subprocess.TimeoutExpired:
            return "config test timed out"
        if p.returncode != 0:
            return (p.stdout + p.stderr).strip()[-600:] or f"exit {p.returncode}"
        return None

    def start_target(self, t: bench_conf.Target) -> None:
        fig = self.tfig(t.name)
        if t.kind == "nginx":
            miss = self.deps.missing("lua" if t.hook else "nginx")
        elif t.kind == "haproxy":
            miss = self.deps.missing("haproxy")
        elif t.kind == "floor":
            miss = None
        else:
            miss = None
            try:
                import importlib.util

                if importlib.util.find_spec("scriptlb") is None:
                    miss = "missing: scriptlb (pip install -e . into this interpreter)"
            except (ImportError, ValueError):
                miss = "missing: scriptlb"
        if miss:
            self.fail(t.name, miss)
            return
        prefix = str(self.work / t.name)
        listen = bench_proc.free_ports(1)[0]
        conf = bench_conf.write_target(t, prefix, listen, self.backend_ports,
                                       fd_limit=bench_proc.nofile_limit(hard=True))
        if t.kind == "haproxy":
            fig["max_conns"] = bench_conf.haproxy_maxconn(bench_proc.nofile_limit(hard=True))
        fig["config"] = conf
        if t.kind == "nginx" and t.hook:
            # nginx -t below dlopen()s these (it fails if they do not load); the routing check
            # then shows the balancer_by_lua_block really chose the peers
            fig["modules"] = [f"{self.deps.lua_modules}/{m}" for m in bench_conf.LUA_MODULES]
            fig["lua_package_path"] = f"{self.deps.lua_resty_core}/?.lua"
        err = self.config_test(t, prefix, conf)
        if err and t.kind == "scriptlb" and t.hook and "balancer_keepalive" in err:
            self.balancer_keepalive = None
            conf = bench_conf.write_target(t, prefix, listen, self.backend_ports, balancer_keepalive=None)
            err = self.config_test(t, prefix, conf)
            self.notes.append(f"{t.name}: scriptlb does not know `balancer_keepalive` yet, so hook-set peers "
                              "share its default pool of 32 idle connections (below wrk's connections: "
                              "some connections are opened per request)")
        if err:
            self.fail(t.name, f"error: config test failed: {err}")
            return
        if t.kind == "nginx":
            argv = [self.deps.nginx, "-p", prefix, "-c", conf, "-e", f"{prefix}/logs/error.log"]
        elif t.kind == "haproxy":
            argv = [self.deps.haproxy, "-db", "-f", conf]
        elif t.kind == "floor":
            argv = [sys.executable, str(HERE / "floor_proxy.py"), str(listen),
                    ",".join(str(p) for p in self.backend_ports)]
            if t.name == "py-floor-headers":
                argv.append("--forward-headers")
        else:
            argv = [sys.executable, "-m", "scriptlb", "-p", prefix, "-c", conf]
        proc = self.procs.start(t.name, argv, cpus=self.cpus_for(t), cwd=str(ROOT))
        if not bench_proc.wait_port(listen, proc, timeout=15):
            self.fail(t.name, f"error: did not start listening: {proc.log_tail(8)}")
            self.procs.stop(proc)
            return
        # the listening socket may be open (the master's) before a worker accepts: wait for one
        # answer, bounded, before checking
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.alive():
            try:
                bench_proc.http_get(listen, "/", timeout=5)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(0.3)  # let every worker come up
        fatal, check = self.routing_check(t, listen)
        fig["check"] = check
        fig["pids"] = bench_proc.tree_pids(proc.pid)
        if fatal:
            tail = proc.log_tail(3).replace("\n", " / ")
            self.fail(t.name, f"error: wrong answers, not measured: {check}"
                      + (f"; log: {tail}" if tail else ""))
            self.procs.stop(proc)
            return
        self.live[t.name] = (proc, listen)
        log(f"{t.name}: up on {listen}, pids {fig['pids']}, check: {check}")

    def routing_check(self, t: bench_conf.Target, port: int) -> tuple[bool, str]:
        """(fatal, text): wrong or failed answers are fatal (the target is not measured); a
        backend choice unlike nginx's (RR spreads over all 4, the hooks follow crc32(uri)) is
        reported beside the figures."""
        seen = []
        try:
            for _ in range(8):
                status, headers, body = bench_proc.http_get(port, "/")
                if status != 200 or body.decode(errors="replace") != bench_conf.SMALL_BODY:
                    return True, f"GET / gave {status} {body[:80]!r}"
                seen.append(headers.get("x-backend"))
            status, _, body = bench_proc.http_get(port, "/big", timeout=5)
            if status != 200 or len(body) != bench_conf.BIG_SIZE:
                return True, f"GET /big gave {status} with {len(body)} bytes"
        except OSError as e:
            return True, f"request failed: {e}"
        ports = [str(p) for p in self.backend_ports]
        if t.hook:
            want = ports[bench_conf.hook_backend_index("/")]
            if any(s != want for s in seen):
                return False, f"hook not applied: / went to {sorted(set(map(str, seen)))}, crc32 says {want}"
        elif len(set(seen)) < (len(ports) if t.workers == 1 else 2):
            return False, f"round robin not spreading: {seen}"
        return False, "ok"

    # ------------------------------------------------------------------ load

    def shares_load_core(self, name: str) -> bool:
        return self.load_cpu in (self.cpus_for(bench_conf.target(name)) or "").split(",")

    def _cores(self, name: str) -> tuple[set[int], set[int]]:
        proxy = self.cpus_for(bench_conf.target(name))
        if proxy is None or self.load_cpu is None:
            return set(), set()
        return {int(c) for c in proxy.split(",")}, {int(self.load_cpu)}

    def backend_status(self) -> dict[str, int] | None:
        if not self.status_port:
            return None
        try:
            return bench_proc.stub_status(self.status_port)
        except (OSError, ValueError, IndexError):
            return None

    def wait_quiet(self, cores: set[int], max_wait: float) -> float:
        """Between runs nothing of ours works on the proxy core: if something else does (over
        20% of it in 0.3 s), wait for it, at most ``max_wait`` seconds. Returns the time waited."""
        if not cores or max_wait <= 0:
            return 0.0
        t0 = time.monotonic()
        while True:
            b0 = bench_proc.core_ticks(cores)[0]
            time.sleep(0.3)
            busy = (bench_proc.core_ticks(cores)[0] - b0) / bench_proc.CLK_TCK / 0.3 / len(cores)
            if busy < 0.2 or time.monotonic() - t0 >= max_wait:
                return time.monotonic() - t0

    def one_run(self, name: str, path: str) -> dict | None:
        proc, port = self.live[name]
        pcores, lcores = self._cores(name)
        if not self.shares_load_core(name):
            self.quiet_waited += self.wait_quiet(pcores, 2.0 if self.args.quick else 4.0)
        url = f"http://127.0.0.1:{port}{path}"
        conns = self.args.connections
        if self.loadgen == "wrk":
            if self.warmup:
                bench_load.run_wrk(self.deps.wrk, url, self.warmup, conns, cpus=self.load_cpu,
                                   taskset=self.deps.taskset)
            s0 = self.backend_status()
            c0 = bench_proc.cpu_split(proc.pid)
            k0 = bench_proc.core_ticks(pcores), bench_proc.core_ticks(lcores), time.monotonic()
            res = bench_load.run_wrk(self.deps.wrk, url, self.duration, conns, cpus=self.load_cpu,
                                     taskset=self.deps.taskset)
            k1 = bench_proc.core_ticks(pcores), bench_proc.core_ticks(lcores), time.monotonic()
            c1 = bench_proc.cpu_split(proc.pid)
        else:
            conns = min(conns, 32)
            if self.warmup:
                bench_load.python_load(port, path, self.warmup, conns)
            s0 = self.backend_status()
            c0 = bench_proc.cpu_split(proc.pid)
            k0 = bench_proc.core_ticks(pcores), bench_proc.core_ticks(lcores), time.monotonic()
            res = bench_load.python_load(port, path, self.duration, conns)
            k1 = bench_proc.core_ticks(pcores), bench_proc.core_ticks(lcores), time.monotonic()
            c1 = bench_proc.cpu_split(proc.pid)
        if not proc.alive():
            raise RuntimeError(f"process exited during the run: {proc.log_tail(8)}")
        if res.requests == 0 or res.errors + res.non2xx > res.requests // 2:
            raise RuntimeError(f"{path}: {res.requests} requests, {res.errors} socket errors, "
                               f"{res.non2xx} non-2xx: {proc.log_tail(5)}")
        d = res.to_dict()
        d["cpu_s"] = (c1[0] - c0[0]) + (c1[1] - c0[1])
        d["sys_pct"] = 100.0 * (c1[1] - c0[1]) / d["cpu_s"] if d["cpu_s"] > 0 else None
        if s0 is not None:
            s1 = self.backend_status()
            if s1 is not None:
                # new upstream connections the proxy opened (minus the first poll's own)
                d["upstream_conns"] = max(0, s1["accepts"] - s0["accepts"] - 1)
                d["upstream_conns_per_1k"] = d["upstream_conns"] / res.requests * 1000
        wall = k1[2] - k0[2]
        if pcores and wall > 0:
            tck = bench_proc.CLK_TCK
            proxy_busy = (k1[0][0] - k0[0][0]) / tck
            # CPU time on the proxy's core(s) spent by anything else (other processes, irqs, steal)
            d["proxy_util_pct"] = 100.0 * d["cpu_s"] / wall / len(pcores)
            d["other_on_proxy_cores_pct"] = max(0.0, 100.0 * (proxy_busy - d["cpu_s"]) / wall / len(pcores))
            d["steal_pct"] = 100.0 * ((k1[0][1] - k0[0][1]) + (k1[1][1] - k0[1][1])) / tck / wall
            d["load_core_busy_pct"] = 100.0 * (k1[1][0] - k0[1][0]) / tck / wall / len(lcores)
        return d

    def measure(self) -> None:
        per_run = self.warmup + self.duration + 0.5
        total = per_run * self.reps * len(self.paths) * max(1, len(self.live))
        log(f"load: {len(self.live)} targets x {len(self.paths)} paths x {self.reps} reps, "
            f"about {total:.0f} s")
        reps: dict[tuple[str, str], list[dict]] = {}
        # leave room for the idle measurement and the report
        stop_at = self.budget - (20 if self.args.quick else 90)
        for rep in range(self.reps):
            for path in self.paths:
                for name in list(self.live):
                    if self.elapsed() + per_run > stop_at:
                        self.notes.append(f"time budget: skipped {name} {path} rep {rep + 1} and later runs")
                        break
                    try:
                        d = self.one_run(name, path)
                        other = d.get("other_on_proxy_cores_pct")
                        if (other is not None and other > NOISY_PCT and self.retries_left > 0
                                and not self.shares_load_core(name)
                                and self.elapsed() + per_run <= stop_at):
                            # something else ran on the proxy's core: run it again, keep the cleaner
                            self.retries_left -= 1
                            log(f"rep {rep + 1} {name} {path}: other work took {other:.0f}% of the "
                                "proxy's core, running it again")
                            d2 = self.one_run(name, path)
                            self.reruns += 1
                            if d2.get("other_on_proxy_cores_pct", 100) < other:
                                d = d2
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                        self.fail(name, f"error: {e}")
                        proc, _ = self.live.pop(name)
                        self.procs.stop(proc)
                        continue
                    reps.setdefault((name, path), []).append(d)
                    log(f"rep {rep + 1} {name:14s} {path:5s} {d['rps']:>10,.0f} req/s  "
                        f"p50 {d['p50_ms'] or 0:.2f} ms  p99 {d['p99_ms'] or 0:.2f} ms  "
                        f"cpu {d['cpu_s']:.2f} s / {d['requests']:,} req")
        if self.quiet_waited > 1:
            self.notes.append(f"waited {self.quiet_waited:.0f} s in all for other work to leave the proxy's "
                              "core before runs (at most 4 s per run; 2 s with --quick)")
        if self.reruns:
            self.notes.append(f"{self.reruns} run(s) repeated because other work used more than "
                              f"{NOISY_PCT}% of the proxy's core; the cleaner run was kept")
        for (name, path), rs in reps.items():
            pf = self.tfig(name)["paths"][path] = bench_report.summarize_reps(rs)
            other = pf.get("other_on_proxy_cores_pct")
            if other is not None and other > NOISY_PCT and not self.shares_load_core(name):
                self.notes.append(f"{name} {path}: other work used {other:.0f}% of the proxy's core(s) "
                                  "during the runs (a busy machine): its figures understate it")
        for name, (proc, _) in self.live.items():
            self.tfig(name)["peak_rss_kib"] = bench_proc.rss_kib(proc.pid, "VmHWM")

    def overload(self) -> None:
        """One run per target and path at --overload-connections (wrk's timeout 5 s): under
        overload the tail latency and the errors (timeouts: requests left hanging) count."""
        conns = self.args.overload_connections
        names = [n for n in bench_conf.OVERLOAD_TARGETS if n in self.live]
        if conns <= 0 or not names or self.loadgen != "wrk":
            return
        out: dict = {}
        stop_at = self.budget - (15 if self.args.quick else 60)
        for path in ("/", "/big"):
            for name in names:
                if self.elapsed() + self.duration + 2 > stop_at:
                    self.notes.append(f"time budget: skipped the {conns}-connection run of {name} {path}")
                    continue
                proc, port = self.live[name]
                try:
                    url = f"http://127.0.0.1:{port}{path}"
                    res = bench_load.run_wrk(self.deps.wrk, url, self.duration, conns, cpus=self.load_cpu,
                                             taskset=self.deps.taskset, timeout=5.0)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                    out.setdefault(name, {})[path] = {"status": f"error: {e}"}
                    continue
                d = res.to_dict()
                d["alive"] = proc.alive()
                out.setdefault(name, {})[path] = d
                log(f"{conns} conns {name:10s} {path:5s} {d['rps']:>10,.0f} req/s  "
                    f"p99 {d['p99_ms'] or 0:.1f} ms  errors {d['errors']} (timeouts {d['timeouts']}), "
                    f"non-2xx {d['non2xx']}")
        self.fig["overload"] = {"connections": conns, "targets": out}

    def idle(self) -> None:
        n_all = self.idle_n
        if n_all <= 0:
            return
        limit = bench_proc.nofile_limit()
        if n_all + 200 > limit:
            self.notes.append(f"idle connections: RLIMIT_NOFILE {limit} < {n_all}+200; opened {limit - 200}")
            n_all = limit - 200
        for name, (proc, port) in list(self.live.items()):
            n = n_all
            if "max_conns" in self.tfig(name) and n > self.tfig(name)["max_conns"] - 64:
                n = self.tfig(name)["max_conns"] - 64
                self.notes.append(f"idle connections: {name} opened {n:,} (its maxconn is "
                                  f"{self.tfig(name)['max_conns']:,}, bounded by RLIMIT_NOFILE)")
            if self.elapsed() > self.budget - 10:
                self.notes.append(f"time budget: skipped the idle-connection measurement of {name}")
                continue
            box: dict = {}
            before = bench_proc.rss_kib(proc.pid)

            def measure(opened: int, box: dict = box, pid: int = proc.pid) -> None:
                box["after"] = bench_proc.rss_kib(pid)
                box["opened"] = opened

            try:
                r = bench_load.hold_idle(port, n, measure, timeout=60 if not self.args.quick else 25)
            except (OSError, RuntimeError) as e:
                self.tfig(name)["idle"] = {"wanted": n, "opened": 0, "note": f"error: {e}"}
                continue
            opened = box.get("opened", r.opened)
            after = box.get("after", before)
            per = (after - before) / opened if opened else None
            note = f"{r.errors} failed ({r.first_error})" if r.errors else ""
            self.tfig(name)["idle"] = {"wanted": n, "opened": opened, "rss_before_kib": before,
                                       "rss_after_kib": after, "kib_per_conn": per,
                                       "open_seconds": round(r.open_seconds, 2), "note": note}
            log(f"idle {name}: {opened:,}/{n:,} connections, RSS {before / 1024:.1f} -> "
                f"{after / 1024:.1f} MiB, {per or 0:.2f} KiB/conn {note}")
            if not proc.alive():
                self.fail(name, f"error: died during the idle-connection test: {proc.log_tail(5)}")
                self.live.pop(name)

    def hook_micro(self) -> None:
        script = HERE / "hook_micro.py"
        if not script.exists():
            self.fig["hook_micro"] = {"status": "missing: bench/hook_micro.py (the hook engineer's "
                                      "micro-benchmark is not in the tree yet)", "us_per_try": None}
            return
        timeout = 20 if self.args.quick else 60
        out = ""
        # its documented options (--runs/--repeat) shorten it for --quick; plain if it refuses them
        for argv in ([sys.executable, str(script), "--runs", "50000", "--repeat", "3"] if self.args.quick
                     else None, [sys.executable, str(script)]):
            if argv is None:
                continue
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                   check=False, start_new_session=True)
            except subprocess.TimeoutExpired:
                out = f"timed out after {timeout} s"
                continue
            out = (p.stdout + p.stderr).strip()
            if p.returncode == 0:
                break
        us = parse_hook_micro(out)
        self.fig["hook_micro"] = {"us_per_try": us, "output": out[-2000:],
                                  "status": "ok" if us is not None else "no µs-per-try figure in its output"}
        log(f"hook micro-benchmark: {us} µs/try")

    def profile(self) -> None:
        pyspy = bench_deps.pyspy()
        prof: dict = {}
        secs = self.args.profile_seconds
        for name in ("scriptlb", "scriptlb-hook"):
            if name not in self.live:
                continue
            if not pyspy or self.loadgen != "wrk":
                prof[name] = {"status": "missing: py-spy (pip install py-spy)" if not pyspy
                              else "needs wrk"}
                continue
            proc, port = self.live[name]
            pids = bench_proc.tree_pids(proc.pid)
            # the worker is the busiest process of the tree (the master idles; helpers such as a
            # hook watchdog may be children too); the root itself with master_process off
            workers = pids[1:] or pids
            worker = max(workers, key=lambda pid: bench_proc.cpu_ticks([pid]))
            out = self.work / f"pyspy-{name}.txt"
            url = f"http://127.0.0.1:{port}/"
            argv = bench_load.wrk_argv(self.deps.wrk, url, secs + 3, self.args.connections)
            if self.deps.taskset and self.load_cpu is not None:
                argv = [self.deps.taskset, "-c", self.load_cpu, *argv]
            load = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                time.sleep(1)
                native = self.args.profile_native
                ok, msg = bench_profile.pyspy_record(pyspy, worker, secs, out, rate=100 if native else 250,
                                                     native=native)
            finally:
                try:
                    load.wait(secs + 10)
                except subprocess.TimeoutExpired:
                    os.killpg(load.pid, signal.SIGKILL)
                    load.wait()
            if not ok:
                prof[name] = {"status": msg, "tool": "py-spy"}
                continue
            s = bench_profile.summarize_raw(out.read_text())
            tool = ("py-spy --native, 100 Hz (pauses the process per sample)" if native
                    else "py-spy --nonblocking, 250 Hz; time in C is charged to the calling Python frame")
            s.update({"tool": tool, "status": "ok", "pid": worker, "raw": str(out)})
            prof[name] = s
            log(f"profiled {name} (pid {worker}): {s['samples']} samples")
        self.fig["profile"] = prof
        self.cprofile()

    def cprofile(self) -> None:
        """Call counts per request: scriptlb (master_process off) under cProfile, loaded by wrk."""
        out: dict = {}
        for name in ("scriptlb", "scriptlb-hook"):
            if name not in self.live or self.loadgen != "wrk":
                continue
            t = bench_conf.target(name)
            prefix = str(self.work / f"{name}-cprofile")
            bench_conf.make_prefix(prefix)
            listen = bench_proc.free_ports(1)[0]
            conf = f"{prefix}/conf/scriptlb.conf"
            Path(conf).write_text(bench_conf.scriptlb_conf(prefix, listen, self.backend_ports, t.hook,
                                                           master=False,
                                                           balancer_keepalive=self.balancer_keepalive))
            dump = Path(prefix) / "scriptlb.prof"
            proc = self.procs.start(f"{name}-cprofile", [sys.executable, str(HERE / "bench_cprofile.py"),
                                                         str(dump), "--", "-p", prefix, "-c", conf],
                                    cpus=self.proxy_cpu, cwd=str(ROOT))
            try:
                if not bench_proc.wait_port(listen, proc, timeout=15):
                    out[name] = {"status": f"did not start: {proc.log_tail(5)}"}
                    continue
                s0 = self.backend_status()
                res = bench_load.run_wrk(self.deps.wrk, f"http://127.0.0.1:{listen}/",
                                         self.args.profile_seconds, self.args.connections,
                                         cpus=self.load_cpu, taskset=self.deps.taskset)
                s1 = self.backend_status()
            finally:
                self.procs.stop(proc, timeout=15)
            served = s1["requests"] - s0["requests"] - 1 if s0 and s1 else res.requests
            if not dump.exists():
                out[name] = {"status": "no profile written (scriptlb did not return from main)"}
                continue
            summary = bench_cprofile.summarize(str(dump), served)
            summary["status"] = "ok"
            summary["rps_under_cprofile"] = res.rps
            out[name] = summary
            log(f"cProfile {name}: {summary['calls_per_request']:.0f} Python calls per request")
        if out:
            self.fig["cprofile"] = out

    # ------------------------------------------------------------------ main

    def run(self) -> int:
        rc = 0
        try:
            self.setup()
            if self.start_backends():
                for t in self.targets:
                    self.start_target(t)
                if self.live:
                    self.measure()
                    self.overload()
                    self.idle()
                    if self.args.profile:
                        self.profile()
            else:
                for t in self.targets:
                    self.fail(t.name, self.deps.missing("nginx") + " for the backends" if not self.deps.nginx
                              else "error: the backends did not start (see notes)")
            self.hook_micro()
        except KeyboardInterrupt:
            self.notes.append("interrupted (Ctrl-C): partial results")
            rc = 130
        except SystemExit as e:
            self.notes.append(f"stopped by a signal: partial results ({e.code})")
            rc = int(e.code) if isinstance(e.code, int) else 1
        finally:
            self.procs.stop_all()
        self.fig["notes"] = self.notes
        self.fig["meta"] = self.fig.get("meta", {})
        self.fig["meta"]["seconds"] = round(self.elapsed(), 1)
        written = bench_report.write_all(self.fig, self.out)
        print(Path(written["md"]).read_text())
        log(f"wrote {written['md']}, {written['json']}, {written['png']} in {self.elapsed():.0f} s")
        return rc


def parse_hook_micro(out: str) -> float | None:
    """The µs-per-try figure from bench/hook_micro.py's output: a JSON field named like
    ``us_per_try``, else the first number followed by µs/us."""
    import json

    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            for k, v in d.items():
                if isinstance(v, int | float) and re.search(r"us|µs|usec|micro", k) and "try" in k:
                    return float(v)
            for k, v in d.items():
                if isinstance(v, int | float) and re.search(r"(^|_)(us|µs|usec)($|_)", k):
                    return float(v)
    m = re.search(r"([\d.]+)\s*(?:µs|us|usec)\s*(?:/|per)\s*try", out)
    if m:  # the first "N us/try" line is the headline case (crc32 of the URI)
        return float(m.group(1))
    m = re.search(r"([\d.]+)\s*(?:µs|us|usec)\b", out)
    return float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h = Harness(args)
    bench_proc.install_cleanup(h.procs)
    return h.run()


if __name__ == "__main__":
    sys.exit(main())

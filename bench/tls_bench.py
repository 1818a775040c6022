"""HTTPS through nginx and through scriptlb: keep-alive req/s and new-connection (handshake) rate.

    .venv/bin/python bench/tls_bench.py [--duration 5] [--reps 2]      (make bench-tls)

One nginx backend (CPU 1) answers a 24-byte body; nginx and scriptlb (1 worker each, CPU 0)
terminate TLS (a trustme certificate, TLSv1.2+1.3) and proxy to it over keep-alive; wrk (CPU 1,
1 thread) drives each in turn, repetitions interleaved, medians reported. Needs nginx and wrk.

Besides req/s, each run's CPU seconds of the proxy's process tree give CPU-seconds per request;
the "CPU-normalized" ratio (nginx's CPU per request / scriptlb's) is what the req/s ratio would
be with each proxy owning its core, which other load on a shared machine barely moves. The same
proxies on a plain-HTTP port give the reference: the part of the gap that is not TLS.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proc import cpu_seconds

BACKEND, NGINX_TLS, SCRIPTLB_TLS = 18081, 18443, 18444
NGINX_PLAIN, SCRIPTLB_PLAIN = 18082, 18083
NGINX_TEMP = "client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; " \
             "uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;"


def proxy_block(port: int, plain_port: int, work: Path) -> str:
    return f"""
        upstream b {{ server 127.0.0.1:{BACKEND}; keepalive 128; }}
        server {{
            listen 127.0.0.1:{plain_port};
            location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
        }}
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem;
            ssl_protocols TLSv1.2 TLSv1.3;
            location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
        }}
    """


def nginx_conf(work: Path, name: str, http: str) -> Path:
    d = work / name
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"daemon off; master_process off; worker_processes 1; pid {d}/pid; "
                    f"error_log {d}/logs/error.log; events {{ worker_connections 4096; }}\n"
                    f"http {{ access_log off; {NGINX_TEMP.format(d=d)} {http} }}\n")
    return conf


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never answered")


def wrk(port: int, duration: int, close: bool, pid: int, scheme: str = "https") -> tuple[float, float]:
    """(req/s, CPU seconds of process tree ``pid`` per 1,000 requests) of one wrk run."""
    args = ["taskset", "-c", "1", "wrk", "-t1", "-c16" if close else "-c32", f"-d{duration}s"]
    if close:
        args += ["-H", "Connection: close"]
    before = cpu_seconds(pid)
    out = subprocess.run([*args, f"{scheme}://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=duration + 30).stdout
    cpu = cpu_seconds(pid) - before
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    rate = float(match.group(1)) if match else 0.0
    requests = int(total.group(1)) if total else 0
    return rate, (cpu * 1000 / requests if requests else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing: {tool}")
    work = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    cert = trustme.CA().issue_cert("bench.test")
    cert.cert_chain_pems[0].write_to_path(work / "cert.pem")
    cert.private_key_pem.write_to_path(work / "key.pem")
    backend = nginx_conf(work, "backend", f'server {{ listen 127.0.0.1:{BACKEND}; '
                                          f'location / {{ return 200 "hello from the backend!\\n"; }} }}')
    proxy = nginx_conf(work, "nginx", proxy_block(NGINX_TLS, NGINX_PLAIN, work))
    lb = work / "scriptlb"
    (lb / "logs").mkdir(parents=True)
    (lb / "scriptlb.conf").write_text(
        f"daemon off; worker_processes 1; pid {lb}/pid; error_log {lb}/logs/error.log; "
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; {proxy_block(SCRIPTLB_TLS, SCRIPTLB_PLAIN, work)} }}\n"
    )
    procs = [
        subprocess.Popen(["taskset", "-c", "1", "nginx", "-p", str(work / "backend"), "-c", str(backend)]),
        subprocess.Popen(["taskset", "-c", "0", "nginx", "-p", str(work / "nginx"), "-c", str(proxy)]),
        subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "scriptlb", "-p", str(lb), "-c",
                          str(lb / "scriptlb.conf")]),
    ]
    try:
        for port in (BACKEND, NGINX_TLS, SCRIPTLB_TLS, NGINX_PLAIN, SCRIPTLB_PLAIN):
            wait_port(port)
        pids = {"nginx": procs[1].pid, "scriptlb": procs[2].pid}
        runs = (("HTTPS keep-alive", "https", False, (NGINX_TLS, SCRIPTLB_TLS)),
                ("HTTPS new connection per request", "https", True, (NGINX_TLS, SCRIPTLB_TLS)),
                ("plain HTTP keep-alive (reference)", "http", False, (NGINX_PLAIN, SCRIPTLB_PLAIN)))
        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.reps):
            for what, scheme, close, ports in runs:
                for name, port in zip(("nginx", "scriptlb"), ports, strict=True):
                    run = wrk(port, args.duration, close, pids[name], scheme)
                    figures.setdefault((name, what), []).append(run)
        for what, *_ in runs:
            ours, theirs = figures[("scriptlb", what)], figures[("nginx", what)]
            rate, nrate = statistics.median(r for r, _ in ours), statistics.median(r for r, _ in theirs)
            cpu, ncpu = statistics.median(c for _, c in ours), statistics.median(c for _, c in theirs)
            print(f"{what}: nginx {nrate:.0f} req/s ({ncpu * 1000:.0f} us CPU/req), "
                  f"scriptlb {rate:.0f} req/s ({cpu * 1000:.0f} us CPU/req); "
                  f"ratio {rate / nrate if nrate else 0:.2f}, CPU-normalized {ncpu / cpu if cpu else 0:.2f}")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGQUIT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""TCP (stream) throughput: scriptlb's stream block beside nginx's stream module and HAProxy
``mode tcp``, one worker each, on 127.0.0.1.

    .venv/bin/python bench/stream_bench.py [--seconds 3] [--megabytes 256] [--out DIR]

Two figures per target, medians of three runs:
- **bulk MB/s**: one connection; the peer sends ``--megabytes`` as fast as it can, the client
  reads and drops them (the relay's copy loop and back-pressure);
- **sessions/s**: sequential short sessions from 4 client threads for ``--seconds``: connect,
  read the peer's one-byte greeting, close (accept, connect to the peer, log, tear down).

The peer and the clients are Python (uvloop / threads): they bound what can be measured, the
same for every target, so the ratios are what to read, on a shared machine only indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
BLOCK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the peer


def _peer_main(bulk_port: int, greet_port: int, megabytes: int) -> None:
    import uvloop

    blob = os.urandom(BLOCK)

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(megabytes):
                writer.write(blob)
                await writer.drain()
            writer.close()

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.close()

    async def main() -> None:
        await asyncio.start_server(bulk, "127.0.0.1", bulk_port, backlog=1024)
        await asyncio.start_server(greet, "127.0.0.1", greet_port, backlog=1024)
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------- targets


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen")


@contextlib.contextmanager
def target(name: str, work: Path, ports: tuple[int, int], peers: tuple[int, int]) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"server {{ listen 127.0.0.1:{p}; proxy_pass 127.0.0.1:{q}; }}"
                        for p, q in zip(ports, peers, strict=True))
    if name == "scriptlb":
        conf = work / "scriptlb.conf"
        conf.write_text(f"daemon off; master_process off; pid {work}/pid; error_log {work}/error.log;\n"
                        f"events {{ worker_connections 4096; }}\nstream {{ {servers} }}\n")
        command = [sys.executable, "-m", "scriptlb", "-p", str(work), "-c", str(conf)]
    elif name == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(f"load_module {NGINX_MODULE};\ndaemon off; master_process off; pid {work}/pid;\n"
                        f"error_log {work}/error.log; events {{ worker_connections 4096; }}\n"
                        f"stream {{ {servers} }}\n")
        command = ["nginx", "-p", str(work), "-c", str(conf)]
    else:
        conf = work / "haproxy.cfg"
        listens = "\n".join(f"listen l{p}\n  bind 127.0.0.1:{p}\n  server s 127.0.0.1:{q}"
                            for p, q in zip(ports, peers, strict=True))
        conf.write_text("global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                        f"  timeout client 30s\n  timeout server 30s\n{listens}\n")
        command = ["haproxy", "-f", str(conf)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(ports[0], proc, name)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- load


def bulk_mb_s(port: int, megabytes: int) -> float:
    started = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        while chunk := conn.recv(1 << 18):
            got += len(chunk)
    elapsed = time.perf_counter() - started
    if got != megabytes * BLOCK:
        raise RuntimeError(f"got {got} bytes, expected {megabytes * BLOCK}")
    return got / elapsed / 1e6


def sessions_per_s(port: int, seconds: float, threads: int = 4) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(index: int) -> None:
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                if conn.recv(1) != b"x":
                    raise RuntimeError("no greeting")
            counts[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    # absolute: scriptlb, like nginx, reads a relative -c path below its -p prefix
    work = Path(args.out or tempfile.mkdtemp(prefix="stream-bench-")).resolve()
    peers = (free_port(), free_port())
    peer = multiprocessing.Process(target=_peer_main, args=(*peers, args.megabytes), daemon=True)
    peer.start()
    names = ["scriptlb"]
    if shutil.which("nginx") and os.path.exists(NGINX_MODULE):
        names.append("nginx")
    if shutil.which("haproxy"):
        names.append("haproxy")
    results: dict[str, dict[str, list[float]]] = {n: {"bulk_mb_s": [], "sessions_s": []} for n in names}
    try:
        for _ in range(args.reps):  # interleaved: A B C A B C ...
            for name in names:
                ports = (free_port(), free_port())
                with target(name, work / name, ports, peers):
                    results[name]["bulk_mb_s"].append(bulk_mb_s(ports[0], args.megabytes))
                    results[name]["sessions_s"].append(sessions_per_s(ports[1], args.seconds))
    finally:
        peer.terminate()
    medians = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    (work / "stream_bench.json").write_text(json.dumps({"runs": results, "medians": medians}, indent=1))
    base = medians["scriptlb"]
    print(f"{'target':<10} {'bulk MB/s':>10} {'sessions/s':>11}   scriptlb ratio (bulk, sessions)")
    for name, figures in medians.items():
        ratio = (f"{base['bulk_mb_s'] / figures['bulk_mb_s']:.2f}, "
                 f"{base['sessions_s'] / figures['sessions_s']:.2f}")
        print(f"{name:<10} {figures['bulk_mb_s']:>10.0f} {figures['sessions_s']:>11.0f}   {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load generation: wrk (runner + output parser), a bounded Python fallback, idle connections.

``run_wrk`` runs ``wrk --latency`` and ``parse_wrk`` turns its text into a ``LoadResult``.
When wrk is missing, ``python_load`` produces the same figures with asyncio (much slower than
wrk, so the harness labels such figures as not comparable). ``hold_idle`` opens N keep-alive
client connections, each having completed one request, for the RSS-per-connection figure.

Every loop here is bounded both in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class LoadResult:
    requests: int
    duration: float  # seconds, as reported by the load generator
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int = 0  # socket errors (connect/read/write/timeout)
    non2xx: int = 0
    bytes_read: float = 0.0
    tool: str = "wrk"
    timeouts: int = 0  # of the errors: requests not answered within wrk's --timeout

    def to_dict(self) -> dict:
        return asdict(self)


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([KMGT]?B)", text.strip())
    if not m:
        return 0.0
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    """Parse ``wrk --latency`` output. Raises ValueError when the summary lines are absent."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+[KMGT]?B) read", out, re.M)
    if not m:
        raise ValueError("wrk output has no 'N requests in T' line")
    requests = int(m.group(1))
    duration = _ms(m.group(2) + m.group(3)) / 1e3
    bytes_read = _bytes(m.group(4))
    rm = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    rps = float(rm.group(1)) if rm else (requests / duration if duration else 0.0)
    pct: dict[str, float] = {}
    dist = out.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pm in re.finditer(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", dist[1], re.M):
            pct[pm.group(1)] = _ms(pm.group(2))
    errors = timeouts = 0
    em = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if em:
        errors = sum(int(x) for x in em.groups())
        timeouts = int(em.group(4))
    nm = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(nm.group(1)) if nm else 0
    return LoadResult(requests, duration, rps, pct.get("50"), pct.get("99"), errors, non2xx, bytes_read,
                      timeouts=timeouts)


def wrk_argv(wrk: str, url: str, duration: float, connections: int, threads: int = 1,
             timeout: float = 2.0) -> list[str]:
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s", "--latency", url]


def run_wrk(wrk: str, url: str, duration: float, connections: int, threads: int = 1,
            cpus: str | None = None, taskset: str | None = None, timeout: float = 2.0) -> LoadResult:
    """Run wrk (pinned with taskset when given) and parse it; bounded by duration + 30 s."""
    argv = wrk_argv(wrk, url, duration, connections, threads, timeout)
    if cpus is not None and taskset:
        argv = [taskset, "-c", cpus, *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False,
                       start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(f"wrk exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return parse_wrk(p.stdout)


# --------------------------------------------------------------------------- HTTP/1.1 client bits


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response (Content-Length, chunked, or until close); (status, keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    keep_alive = not lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            keep_alive = value != b"close"
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # body until close
        keep_alive = False
    return status, keep_alive


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def _percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


async def _python_load(port: int, path: str, duration: float, connections: int,
                       max_requests: int) -> LoadResult:
    lat: list[float] = []
    counts = {"errors": 0, "non2xx": 0, "done": 0}
    req = _request(path)
    deadline = time.monotonic() + duration

    async def one_conn() -> None:
        reader = writer = None
        try:
            while time.monotonic() < deadline and counts["done"] < max_requests:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.perf_counter()
                writer.write(req)
                assert reader is not None
                status, keep = await read_response(reader)
                lat.append((time.perf_counter() - t0) * 1e3)
                counts["done"] += 1
                if not 200 <= status < 400:
                    counts["non2xx"] += 1
                if not keep:
                    writer.close()
                    reader = writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["errors"] += 1
        finally:
            if writer is not None:
                writer.close()

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one_conn()) for _ in range(connections)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 10)
    except TimeoutError:
        for t in tasks:
            t.cancel()
    elapsed = time.monotonic() - t0
    lat.sort()
    n = counts["done"]
    return LoadResult(n, elapsed, n / elapsed if elapsed else 0.0, _percentile(lat, 50),
                      _percentile(lat, 99), counts["errors"], counts["non2xx"], 0.0, "python")


def python_load(port: int, path: str = "/", duration: float = 2.0, connections: int = 16,
                max_requests: int = 1_000_000) -> LoadResult:
    """The fallback load generator: keep-alive GETs on ``connections`` connections until
    ``duration`` seconds or ``max_requests`` requests, whichever comes first."""
    return asyncio.run(_python_load(port, path, duration, connections, max_requests))


# --------------------------------------------------------------------------- idle connections


@dataclass
class IdleResult:
    wanted: int
    opened: int
    errors: int
    first_error: str | None
    open_seconds: float


async def _hold_idle(port: int, n: int, path: str, measure: Callable[[int], None],
                     concurrency: int, timeout: float) -> IdleResult:
    conns: list[asyncio.StreamWriter] = []
    errors = 0
    ok = 0
    first_error: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    req = _request(path)
    give_up = asyncio.Event()

    async def one() -> None:
        nonlocal errors, ok
        async with sem:
            if give_up.is_set():
                return
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                conns.append(writer)
                writer.write(req)
                await asyncio.wait_for(read_response(reader), 10)
                ok += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    TimeoutError) as e:
                errors += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
                if errors >= 50 and ok == 0:
                    give_up.set()  # the server answers none: stop early

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout)
    except TimeoutError:
        for t in tasks:
            t.cancel()
        errors += sum(1 for t in tasks if not t.done() or t.cancelled())
    opened = ok
    elapsed = time.monotonic() - t0
    try:
        await asyncio.sleep(0.5)  # let the proxy settle (buffers freed after the response)
        measure(opened)
    finally:
        for w in conns:
            with contextlib.suppress(Exception):
                w.transport.abort()
        await asyncio.sleep(0.2)
    return IdleResult(n, opened, errors, first_error[0] if first_error else None, elapsed)


def hold_idle(port: int, n: int, measure: Callable[[int], None], path: str = "/",
              concurrency: int = 200, timeout: float = 60.0) -> IdleResult:
    """Open ``n`` client connections to ``port``, one completed keep-alive request on each,
    call ``measure(opened)`` while they are all open and idle, then close them."""
    return asyncio.run(_hold_idle(port, n, path, measure, concurrency, timeout))

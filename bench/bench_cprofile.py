"""Run scriptlb under cProfile: ``python bench/bench_cprofile.py OUT.prof -- SCRIPTLB ARGS...``.

Meant for a config with ``master_process off`` (one process serves): the profile is written
when scriptlb returns from ``main`` (SIGTERM/SIGINT/SIGQUIT make it return), through atexit.
cProfile slows the proxy down, so its times are inflated; its call counts are exact, which is
what the harness reports per request.
"""

from __future__ import annotations

import atexit
import cProfile
import sys


def main() -> int:
    out = sys.argv[1]
    args = sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--" else sys.argv[2:]
    prof = cProfile.Profile()

    def dump() -> None:
        prof.disable()
        prof.dump_stats(out)

    atexit.register(dump)
    sys.argv = ["scriptlb", *args]
    from scriptlb.cli import main as scriptlb_main

    prof.enable()
    return scriptlb_main()


def summarize(path: str, requests: int, top: int = 25) -> dict:
    """Per-request call counts and the top functions by own time from a cProfile dump."""
    import pstats

    st = pstats.Stats(path)
    rows = []
    total_calls = 0
    for (file, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        total_calls += nc
        short = file.split("/scriptlb/", 1)[-1] if "/scriptlb/" in file else file.rsplit("/", 1)[-1]
        rows.append((tt, ct, nc, f"{name} ({short}:{line})"))
    total_tt = sum(r[0] for r in rows) or 1.0
    rows.sort(reverse=True)
    per = max(1, requests)
    return {
        "requests": requests,
        "calls_per_request": total_calls / per,
        "top": [
            {"function": fn, "own_pct": 100.0 * tt / total_tt, "calls_per_request": nc / per,
             "own_us_per_request": tt / per * 1e6, "cum_us_per_request": ct / per * 1e6}
            for tt, ct, nc, fn in rows[:top]
        ],
    }


if __name__ == "__main__":
    sys.exit(main())

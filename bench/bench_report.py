"""Report writing: figures (a plain dict) -> markdown table, JSON file, PNG chart.

The figures dict is what ``run.py`` collects (and what the JSON file holds)::

    {"meta": {...}, "settings": {...}, "pinning": "...", "notes": [...],
     "targets": {name: {"label", "status", "paths": {"/": {"rps", "p50_ms", "p99_ms",
                 "cpu_s_per_1k", "requests", "errors", "non2xx", "reps": [...]}},
                 "peak_rss_kib", "idle": {...}, "check": "..."}},
     "hook_micro": {...}, "profile": {...}}

``ratios`` and ``goals`` are derived here so a report can be rebuilt from a JSON file alone.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# (name, numerator target, denominator target, metric, goal text, goal test)
RATIOS = (
    ("scriptlb-hook-module / scriptlb-hook-ported req/s", "scriptlb-hook-module", "scriptlb-hook-ported",
     "rps",
     ">= 0.95 (a module import costs what inline code does)", lambda r: r >= 0.95),
    ("scriptlb-hook / nginx-lua req/s", "scriptlb-hook", "nginx-lua", "rps", ">= 1.0", lambda r: r >= 1.0),
    ("scriptlb-hook / nginx-lua p99", "scriptlb-hook", "nginx-lua", "p99_ms", "<= 1.5", lambda r: r <= 1.5),
    ("scriptlb / nginx-lua req/s", "scriptlb", "nginx-lua", "rps", None, None),
    ("scriptlb / nginx req/s", "scriptlb", "nginx", "rps", ">= 0.9", lambda r: r >= 0.9),
    ("scriptlb / nginx p99", "scriptlb", "nginx", "p99_ms", None, None),
    ("scriptlb-hook / scriptlb req/s", "scriptlb-hook", "scriptlb", "rps", ">= 0.9 (hook costs <= 10%)",
     lambda r: r >= 0.9),
    ("scriptlb / haproxy req/s", "scriptlb", "haproxy", "rps", None, None),
    ("scriptlb-2w / scriptlb req/s", "scriptlb-2w", "scriptlb", "rps", None, None),
    # the budget of the live peer statistics: at most 3% of the throughput
    ("scriptlb / scriptlb-nostats req/s", "scriptlb", "scriptlb-nostats", "rps",
     ">= 0.97 (peer statistics cost <= 3%)", lambda r: r >= 0.97),
    # CPU-normalized: the inverse ratio of the proxies' CPU seconds per request. It predicts the
    # req/s ratio when each proxy saturates its own core, and other work on the machine (which
    # skews req/s) barely moves it.
    ("CPU-normalized scriptlb-hook / nginx-lua", "nginx-lua", "scriptlb-hook", "cpu_s_per_1k", ">= 1.0",
     lambda r: r >= 1.0),
    ("CPU-normalized scriptlb / nginx", "nginx", "scriptlb", "cpu_s_per_1k", ">= 0.9", lambda r: r >= 0.9),
    ("CPU-normalized scriptlb-hook / scriptlb", "scriptlb", "scriptlb-hook", "cpu_s_per_1k", ">= 0.9",
     lambda r: r >= 0.9),
    ("CPU-normalized scriptlb / scriptlb-nostats", "scriptlb-nostats", "scriptlb", "cpu_s_per_1k",
     ">= 0.97", lambda r: r >= 0.97),
    # the optional py-floor reference (bench/floor_proxy.py): how far scriptlb is from the floor
    ("scriptlb / py-floor req/s", "scriptlb", "py-floor", "rps", None, None),
    ("CPU-normalized scriptlb / py-floor", "py-floor", "scriptlb", "cpu_s_per_1k", None, None),
    # what forwarding the client's headers and a read timeout cost the floor itself
    ("CPU-normalized py-floor-headers / py-floor", "py-floor", "py-floor-headers", "cpu_s_per_1k",
     None, None),
)
IDLE_GOAL_KIB = 8.0


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def summarize_reps(reps: list[dict]) -> dict:
    """Medians over repetitions of one target and path (reps: LoadResult dicts + cpu_s)."""
    out: dict = {"reps": reps}
    out["rps"] = median([r["rps"] for r in reps])
    out["p50_ms"] = median([r["p50_ms"] for r in reps])
    out["p99_ms"] = median([r["p99_ms"] for r in reps])
    out["cpu_s_per_1k"] = median(
        [r["cpu_s"] / r["requests"] * 1000 for r in reps if r.get("cpu_s") is not None and r["requests"]]
    )
    for k in ("proxy_util_pct", "other_on_proxy_cores_pct", "steal_pct", "load_core_busy_pct",
              "upstream_conns_per_1k", "sys_pct"):
        out[k] = median([r[k] for r in reps if r.get(k) is not None])
    out["requests"] = sum(r["requests"] for r in reps)
    out["errors"] = sum(r.get("errors", 0) for r in reps)
    out["non2xx"] = sum(r.get("non2xx", 0) for r in reps)
    return out


def _metric(fig: dict, target: str, metric: str, path: str = "/") -> float | None:
    t = fig.get("targets", {}).get(target)
    if not t or t.get("status") != "ok":
        return None
    return t.get("paths", {}).get(path, {}).get(metric)


def ratios(fig: dict, path: str = "/") -> list[dict]:
    out = []
    for name, num, den, metric, goal, test in RATIOS:
        a, b = _metric(fig, num, metric, path), _metric(fig, den, metric, path)
        value = a / b if a is not None and b else None
        met = None if value is None or test is None else bool(test(value))
        out.append({"name": name, "value": value, "goal": goal, "met": met, "targets": [num, den]})
    idle = fig.get("targets", {}).get("scriptlb", {}).get("idle", {})
    per = idle.get("kib_per_conn")
    out.append({"name": "scriptlb RSS per idle keep-alive connection (KiB)", "value": per,
                "goal": f"<= {IDLE_GOAL_KIB:g} KiB", "met": None if per is None else per <= IDLE_GOAL_KIB})
    hm = fig.get("hook_micro", {}).get("us_per_try")
    out.append({"name": "hook cost (µs per try, bench/hook_micro.py)", "value": hm, "goal": "<= 3 µs",
                "met": None if hm is None else hm <= 3.0})
    return out


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(fig: dict) -> str:
    paths = fig.get("settings", {}).get("paths", ["/"])
    lines = ["# scriptlb benchmark", ""]
    meta = fig.get("meta", {})
    if meta:
        lines.append(f"Run {meta.get('started', '?')} on {meta.get('machine', '?')}, "
                     f"{meta.get('cpus', '?')} CPUs; command: `{meta.get('command', 'python bench/run.py')}`")
        lines.append("")
    s = fig.get("settings", {})
    if s:
        lines.append(
            f"wrk: {s.get('connections')} connections, {s.get('threads')} thread, {s.get('duration')} s "
            f"measured after {s.get('warmup')} s warm-up, {s.get('reps')} interleaved repetitions "
            f"(medians shown); load generator: {s.get('loadgen')}."
        )
    if fig.get("pinning"):
        lines.append(f"Pinning: {fig['pinning']}")
    lines.append("")
    head = ["target"]
    for p in paths:
        head += [f"req/s {p}", f"p50 ms {p}", f"p99 ms {p}", f"CPU s/1k req {p}"]
    head += ["peak RSS MiB", "idle KiB/conn", "status"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for name, t in fig.get("targets", {}).items():
        row = [name]
        for p in paths:
            pf = t.get("paths", {}).get(p, {})
            row += [_f(pf.get("rps")), _f(pf.get("p50_ms"), "{:.2f}"), _f(pf.get("p99_ms"), "{:.2f}"),
                    _f(pf.get("cpu_s_per_1k"), "{:.3f}")]
        rss = t.get("peak_rss_kib")
        row.append(_f(rss / 1024 if rss else None, "{:.1f}"))
        row.append(_f(t.get("idle", {}).get("kib_per_conn"), "{:.2f}"))
        status = t.get("status", "?")
        errs = sum(pf.get("errors", 0) + pf.get("non2xx", 0) for pf in t.get("paths", {}).values())
        if errs:
            status += f" ({errs} errors/non-2xx)"
        if t.get("check") and t["check"] != "ok":
            status += f"; check: {t['check']}"
        row.append(status)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Ratios (on `/`, medians) and the targets", "",
              "| ratio | measured | goal | met |", "|---|---|---|---|"]
    ran = set(fig.get("targets", {}))
    for r in ratios(fig):
        if not set(r.get("targets", ())) <= ran:
            continue  # a target this run was not asked for
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['name']} | {_f(r['value'], '{:.2f}')} | {r['goal'] or '—'} | {met} |")
    health = [(n, p, pf) for n, t in fig.get("targets", {}).items()
              for p, pf in t.get("paths", {}).items() if pf.get("proxy_util_pct") is not None]
    if health:
        lines += ["", "## Run health (medians): is the proxy the bottleneck, was its core shared?", "",
                  "| target | path | proxy CPU % of its cores | kernel share of proxy CPU % | "
                  "other work on proxy cores % | load core busy % | steal % | "
                  "upstream conns opened per 1k req | req/s per rep |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, p, pf in health:
            per_rep = ", ".join(f"{r['rps']:,.0f}" for r in pf.get("reps", []))
            lines.append(f"| {n} | {p} | {_f(pf['proxy_util_pct'])} | {_f(pf.get('sys_pct'))} | "
                         f"{_f(pf.get('other_on_proxy_cores_pct'))} | {_f(pf.get('load_core_busy_pct'))} | "
                         f"{_f(pf.get('steal_pct'), '{:.1f}')} | "
                         f"{_f(pf.get('upstream_conns_per_1k'), '{:.1f}')} | {per_rep} |")
    overload = fig.get("overload")
    if overload and overload.get("targets"):
        title = f"## {overload['connections']:,} concurrent connections (one run each, wrk timeout 5 s)"
        lines += ["", title, "",
                  "| target | path | req/s | p99 ms | socket errors | of which timeouts | non-2xx |",
                  "|---|---|---|---|---|---|---|"]
        for n, per_path in overload["targets"].items():
            for p, d in per_path.items():
                if "rps" not in d:
                    lines.append(f"| {n} | {p} | {d.get('status', '?')} | | | | |")
                    continue
                lines.append(f"| {n} | {p} | {_f(d['rps'])} | {_f(d.get('p99_ms'), '{:.1f}')} | "
                             f"{d.get('errors', 0)} | {d.get('timeouts', 0)} | {d.get('non2xx', 0)} |")
    idle_rows = [(n, t["idle"]) for n, t in fig.get("targets", {}).items() if t.get("idle")]
    if idle_rows:
        lines += ["", "## Idle keep-alive client connections", "",
                  "| target | opened | RSS before MiB | RSS after MiB | KiB per connection | note |",
                  "|---|---|---|---|---|---|"]
        for n, i in idle_rows:
            lines.append(f"| {n} | {i.get('opened', 0):,}/{i.get('wanted', 0):,} | "
                         f"{_f(i.get('rss_before_kib', 0) / 1024, '{:.1f}')} | "
                         f"{_f(i.get('rss_after_kib', 0) / 1024, '{:.1f}')} | "
                         f"{_f(i.get('kib_per_conn'), '{:.2f}')} | {i.get('note', '')} |")
    hm = fig.get("hook_micro")
    if hm:
        lines += ["", "## Hook cost", ""]
        if hm.get("us_per_try") is not None:
            lines.append(f"{hm['us_per_try']:.2f} µs per try (bench/hook_micro.py).")
        else:
            lines.append(hm.get("status", "missing"))
        if hm.get("output"):
            lines += ["", "```", hm["output"].strip()[-1500:], "```"]
    prof = fig.get("profile")
    if prof:
        lines += ["", "## Profile of scriptlb under load", ""]
        for name, p in prof.items():
            lines.append(f"### {name} ({p.get('tool', '?')}, {p.get('samples', '?')} samples)")
            lines.append("")
            if p.get("status") and p["status"] != "ok":
                lines.append(p["status"])
                continue
            lines += ["Self time (leaf frames):", "", "| % | function |", "|---|---|"]
            for pct, fn in p.get("self", [])[:25]:
                lines.append(f"| {pct:.1f} | `{fn}` |")
            lines += ["", "Inclusive time (without the entry chain on every stack: "
                      f"{', '.join(p.get('root', [])[:12]) or '—'}):", "", "| % | function |", "|---|---|"]
            for pct, fn in p.get("inclusive", [])[:25]:
                lines.append(f"| {pct:.1f} | `{fn}` |")
            lines.append("")
    cprof = fig.get("cprofile")
    if cprof:
        lines += ["", "## Python function calls per request (cProfile, master_process off)", ""]
        for name, p in cprof.items():
            if p.get("status") != "ok":
                lines += [f"{name}: {p.get('status')}", ""]
                continue
            lines += [f"### {name}: {p['calls_per_request']:.0f} calls per request "
                      f"({p['requests']:,} requests; times inflated by cProfile)", "",
                      "| own time % | calls/request | own µs/request | cumulative µs/request | function |",
                      "|---|---|---|---|---|"]
            for r in p["top"]:
                lines.append(f"| {r['own_pct']:.1f} | {r['calls_per_request']:.2f} | "
                             f"{r['own_us_per_request']:.1f} | {r['cum_us_per_request']:.1f} | "
                             f"`{r['function']}` |")
            lines.append("")
    if fig.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in fig["notes"]]
    return "\n".join(lines) + "\n"


def chart(fig: dict, path: Path) -> str | None:
    """Write the PNG (req/s and p99 per target); returns an error text instead of raising."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "missing: matplotlib (pip install matplotlib)"
    paths = fig.get("settings", {}).get("paths", ["/"])
    names = [n for n, t in fig.get("targets", {}).items() if t.get("status") == "ok"]
    if not names:
        return "no target produced figures"
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(paths)
    for k, p in enumerate(paths):
        xs = [i + (k - (len(paths) - 1) / 2) * width for i in range(len(names))]
        rps = [fig["targets"][n]["paths"].get(p, {}).get("rps") or 0 for n in names]
        p99 = [fig["targets"][n]["paths"].get(p, {}).get("p99_ms") or 0 for n in names]
        bars = axes[0].bar(xs, rps, width, label=f"GET {p}")
        axes[0].bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in rps], fontsize=7)
        bars = axes[1].bar(xs, p99, width, label=f"GET {p}")
        axes[1].bar_label(bars, labels=[f"{v:.1f}" for v in p99], fontsize=7)
    titles = ("requests/s (higher is better)", "p99 latency, ms (lower is better)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    figure.suptitle("scriptlb vs nginx, nginx+lua, HAProxy (1 worker each unless noted; medians)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def write_all(fig: dict, out: Path, stem: str = "bench") -> dict[str, str]:
    """Write ``stem``.md/.json/.png under ``out``; returns {kind: path or error}."""
    out.mkdir(parents=True, exist_ok=True)
    fig = dict(fig)
    fig["ratios"] = ratios(fig)
    written = {}
    png = out / f"{stem}.png"
    err = chart(fig, png)
    if err:
        fig.setdefault("notes", []).append(f"chart not written: {err}")
        written["png"] = err
    else:
        written["png"] = str(png)
    md = out / f"{stem}.md"
    md.write_text(markdown(fig))
    written["md"] = str(md)
    js = out / f"{stem}.json"
    js.write_text(json.dumps(fig, indent=2, default=str) + "\n")
    written["json"] = str(js)
    return written

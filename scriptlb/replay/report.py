"""A replay's figures: a summary dict (``--json``), a text table, and a PNG (``--plot``)."""

from __future__ import annotations

from typing import Any

from scriptlb.replay.engine import NO_PEER, Result


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted ``values`` (0.0 when empty)."""
    if not values:
        return 0.0
    rank = min(len(values) - 1, max(int(share * len(values) + 0.5) - 1, 0))
    return values[rank]


def summary(result: Result) -> dict[str, Any]:
    """Per peer: tries, share, failures; totals: requests, tries, retries, fallbacks with their
    reasons, simulated latency p50/p95/p99, error responses."""
    latencies = sorted(result.latencies)
    total = result.total_tries or 1
    peers = [
        {"peer": name, "tries": tries, "share": round(tries / total, 4), "failures": failures}
        for name, tries, failures in zip(result.peer_names, result.tries, result.failures, strict=True)
    ]
    errors = sum(count for status, count in result.statuses.items() if status >= 500)
    return {
        "config": result.config,
        "upstream": result.upstream,
        "requests": result.requests,
        "other_locations": result.elsewhere,
        "tries": result.total_tries,
        "retries": result.retries,
        "fallbacks": dict(sorted(result.fallbacks.items())),
        "log_hook_errors": dict(sorted(result.log_hook_errors.items())),
        "error_responses": errors,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "latency": {
            "p50": round(percentile(latencies, 0.50), 6),
            "p95": round(percentile(latencies, 0.95), 6),
            "p99": round(percentile(latencies, 0.99), 6),
        },
        "peers": peers,
        "hook_log_lines": result.hook_logs,
    }


def moved(a: Result, b: Result) -> int:
    """Requests whose first try went to a different peer in ``b`` than in ``a``."""
    names_a, names_b = a.peer_names, b.peer_names
    count = 0
    for first_a, first_b in zip(a.first_peer, b.first_peer, strict=True):
        name_a = names_a[first_a] if first_a != NO_PEER else None
        name_b = names_b[first_b] if first_b != NO_PEER else None
        count += name_a != name_b
    return count


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def table(summaries: list[dict[str, Any]]) -> str:
    """The summaries side by side, one column per config."""
    names = [s["config"].rsplit("/", 1)[-1] for s in summaries]
    rows: list[tuple[str, list[str]]] = [
        ("requests", [str(s["requests"]) for s in summaries]),
        ("tries", [str(s["tries"]) for s in summaries]),
        ("retries", [str(s["retries"]) for s in summaries]),
        ("error responses (5xx)", [str(s["error_responses"]) for s in summaries]),
        (
            "hook fallbacks",
            [", ".join(f"{k} {v}" for k, v in s["fallbacks"].items()) or "0" for s in summaries],
        ),
        (
            "log hook errors",
            [", ".join(f"{k} {v}" for k, v in s["log_hook_errors"].items()) or "0" for s in summaries],
        ),
        ("latency p50", [_ms(s["latency"]["p50"]) for s in summaries]),
        ("latency p95", [_ms(s["latency"]["p95"]) for s in summaries]),
        ("latency p99", [_ms(s["latency"]["p99"]) for s in summaries]),
    ]
    if any(s["other_locations"] for s in summaries):  # only for configs routing elsewhere too
        rows.insert(1, ("other locations' requests", [str(s["other_locations"]) for s in summaries]))
    peer_names: list[str] = []
    for s in summaries:
        for peer in s["peers"]:
            if peer["peer"] not in peer_names:
                peer_names.append(peer["peer"])
    for name in peer_names:
        cells = []
        for s in summaries:
            peer = next((p for p in s["peers"] if p["peer"] == name), None)
            cells.append(
                f"{peer['share']:6.1%} {peer['tries']:>8} tries {peer['failures']:>6} failed" if peer else "-"
            )
        rows.append((f"peer {name}", cells))
    width = max(len(label) for label, _ in rows)
    columns = [max(len(names[i]), *(len(cells[i]) for _, cells in rows)) for i in range(len(summaries))]
    lines = [" " * width + "  " + "  ".join(n.ljust(columns[i]) for i, n in enumerate(names))]
    for label, cells in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(c.ljust(columns[i]) for i, c in enumerate(cells)))
    return "\n".join(line.rstrip() for line in lines)


def plot(results: list[Result], path: str, title: str = "") -> None:
    """Share of tries per peer over time, and latency percentiles over time, per config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'scriptlb[replay]'") from None
    figure, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 7), squeeze=False, sharey="row")
    for column, result in enumerate(results):
        hours = result.bucket_width * len(result.buckets) > 3 * 3600  # a long trace: in hours
        unit, per = ("hours", 3600) if hours else ("minutes", 60)
        minutes = [(i + 0.5) * result.bucket_width / per for i in range(len(result.buckets))]
        shares_axis, latency_axis = axes[0][column], axes[1][column]
        for index, name in enumerate(result.peer_names):
            shares = [b[index] / sum(b) if sum(b) else 0.0 for b in result.buckets]
            if any(shares):
                shares_axis.plot(minutes, shares, label=name)
        shares_axis.set_title(result.config.rsplit("/", 1)[-1])
        shares_axis.set_ylabel("share of tries")
        shares_axis.legend(fontsize="small")
        shares_axis.grid(alpha=0.3)
        for share, style in ((0.5, "-"), (0.95, "--"), (0.99, ":")):
            values = [percentile(sorted(b), share) * 1000 for b in result.bucket_latencies]
            latency_axis.plot(minutes[: len(values)], values, style, label=f"p{round(share * 100)}")
        latency_axis.set_xlabel(f"{unit} into the trace")
        latency_axis.set_ylabel("request latency (ms)")
        latency_axis.legend(fontsize="small")
        latency_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

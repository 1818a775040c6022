"""``prometheus;`` on a real master with two workers: the exposition parses with
prometheus_client's own parser and adds up exactly to the traffic sent."""

from __future__ import annotations

import http.client
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Backends, echo, free_ports, master_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def fetch(port: int, path: str = "/") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, content_type, body = fetch(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def grew_by(before: dict, count: int, **labels: str) -> Callable[[dict, str], bool]:
    """A condition for ``Scraper.settled``: the named total (of the series with ``labels``)
    grew by ``count`` since ``before``."""
    return lambda samples, name: total(samples, name, **labels) - total(before, name, **labels) == count


# Figures each worker publishes on its own schedule: in two scrapes in a row, the requests and
# responses grew by the earlier scrape and the others not at all: the figures have settled.
_ONE_MORE = ("scriptlb_http_requests_total", "scriptlb_http_responses_total")
_SETTLING = ("scriptlb_upstream_server_requests_total", "scriptlb_hook_runs_total",
             "scriptlb_hook_duration_seconds_count")


class Scraper:
    """Scrapes one port and numbers the scrapes (each is a request the later ones count)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0

    def __call__(self) -> dict:
        self.count += 1
        return scrape(self.port)

    def settled(self, **reached: Callable[[dict, str], bool]) -> tuple[dict, int]:
        """A scrape taken once the workers' figures stopped moving and every ``reached``
        condition holds, and its number: what a fixed sleep guessed, and a loaded machine can
        outlast."""
        previous = [(self(), self.count)]

        def confirmed() -> tuple[dict, int] | None:
            current = self()
            (last, number), previous[0] = previous[0], (current, self.count)
            moved = any(total(current, name) != total(last, name) + 1 for name in _ONE_MORE) or any(
                total(current, name) != total(last, name) for name in _SETTLING)
            if moved or not all(check(last, name) for name, check in reached.items()):
                return None
            return last, number

        return wait_for(confirmed, 15, "the workers' figures to settle", 0.2)  # type: ignore[return-value]


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all((k, w) in lbl for k, w in labels.items()))


def test_metrics_add_up_over_two_workers(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with Backends(echo(), echo()) as bk:
        conf = tmp_path / "conf" / "scriptlb.conf"
        conf.parent.mkdir()
        conf.write_text(textwrap.dedent(f"""\
            daemon off;
            worker_processes 2;
            error_log logs/error.log notice;
            events {{}}
            http {{
                upstream backend {{ server {bk[0].addr}; server {bk[1].addr}; }}
                upstream hooked {{
                    server {bk[0].addr};
                    balancer_by_python_block {{
                        balancer.set_current_peer(upstream.get_primary_peers()[0]["name"])
                    }}
                }}
                server {{
                    listen 127.0.0.1:{port} reuseport;
                    status_zone front;
                    location / {{ proxy_pass http://backend; }}
                    location /hooked {{ proxy_pass http://hooked; }}
                    location = /metrics {{ prometheus; }}
                    location = /status {{ stub_status; }}
                    location /api {{ api; }}
                }}
            }}
            """))
        with master_process(tmp_path, conf):
            wait_for(lambda: _up(port), what="the metrics location")
            scraper = Scraper(port)
            before, first = scraper.settled()  # every worker published its start
            sent = 40
            for _ in range(sent):
                assert fetch(port)[0] == 200
            hooked = 6
            for _ in range(hooked):
                assert fetch(port, "/hooked")[0] == 200
            # the other worker's figures come within 100 ms, its hook runs within 1 s
            after, last = scraper.settled(
                scriptlb_upstream_server_requests_total=grew_by(before, sent, upstream="backend"),
                scriptlb_hook_runs_total=grew_by(before, hooked, upstream="hooked"))
            scrapes = last - first  # the scrapes ``after`` counts: ``before`` and those up to it
            answered = [scraper.count - last + 1]  # ``after`` and the scrapes since

            def zone_counts_the_scrapes() -> bool:
                zone = json.loads(fetch(port, "/api/9/http/server_zones/front")[2])
                expected = total(after, "scriptlb_http_responses_total", code="2xx") + answered[0]
                answered[0] += 1  # this call, for the next one
                return zone["responses"]["2xx"] == expected

            wait_for(zone_counts_the_scrapes, 10, "the server zone to count the scrapes", 0.2)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("scriptlb_http_requests_total") == sent + hooked + scrapes  # and the scrapes themselves
    assert delta("scriptlb_upstream_server_requests_total", upstream="backend") == sent
    assert delta("scriptlb_hook_runs_total", upstream="hooked", phase="balancer", outcome="ok") == hooked
    assert delta("scriptlb_hook_duration_seconds_count", upstream="hooked") == hooked
    assert delta("scriptlb_upstream_server_responses_total", upstream="backend", code="2xx") == sent
    assert delta("scriptlb_upstream_server_responses_total", code="5xx") == 0
    assert delta("scriptlb_upstream_server_response_time_seconds_count", upstream="backend") == sent
    buckets = "scriptlb_upstream_server_response_time_seconds_bucket"
    assert delta(buckets, upstream="backend", le="+Inf") == sent
    # the scrapes' responses are counted in the next ones
    assert delta("scriptlb_http_responses_total", server_zone="front", code="2xx") == sent + hooked + scrapes
    # both servers took a share, and the per-server series add up to the totals
    shares = [delta("scriptlb_upstream_server_requests_total", upstream="backend", server=b.addr)
              for b in bk]
    assert sum(shares) == sent and all(shares)
    assert total(after, "scriptlb_upstream_server_state") == 3
    assert total(after, "scriptlb_connections", state="accepted") >= sent + 2
    assert total(after, "scriptlb_connections", state="active") >= 1


def _up(port: int) -> bool:
    try:
        return fetch(port, "/metrics")[0] == 200
    except OSError:
        return False


def test_grafana_dashboard_uses_only_exported_families() -> None:
    import json
    import re

    from scriptlb.ops import metrics

    root = Path(__file__).resolve().parent.parent
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"scriptlb_[a-z_]+", target["expr"])}
    exported = set(re.findall(r"``(scriptlb_[a-z_]+)", metrics.__doc__ or ""))
    histogram_parts = {f"{name}_bucket" for name in exported}
    assert used and used <= exported | histogram_parts

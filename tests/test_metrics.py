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


class Scraper:
    """Scrapes one port, counting the scrapes answered: each is a request the figures count
    (at its start, as nginx counts requests; its response once it is sent)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered = 0

    def __call__(self) -> dict:
        samples = scrape(self.port)
        self.answered += 1
        return samples

    def up(self) -> bool:
        try:
            self()
        except OSError:
            return False
        return True

    def once(self, reached: Callable[[dict, int], bool], what: str) -> dict:
        """The first scrape whose figures say ``reached(samples, scrapes counted in them)``:
        the other worker publishes its figures within 100 ms, its hook runs within 1 s, later
        on a loaded machine; a fixed sleep guessed, this waits for exact figures."""

        def scrape_reaching() -> dict | None:
            samples = self()
            return samples if reached(samples, self.answered) else None

        return wait_for(scrape_reaching, 15, what, 0.1)  # type: ignore[return-value]


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
            scraper = Scraper(port)
            wait_for(scraper.up, what="the metrics location")
            sent = 40
            for _ in range(sent):
                assert fetch(port)[0] == 200
            hooked = 6
            for _ in range(hooked):
                assert fetch(port, "/hooked")[0] == 200

            def everything_counted(samples: dict, scrapes: int) -> bool:
                proxied = total(samples, "scriptlb_upstream_server_responses_total", upstream="backend")
                return (total(samples, "scriptlb_http_requests_total") == sent + hooked + scrapes
                        and proxied == sent
                        and total(samples, "scriptlb_hook_runs_total", upstream="hooked") == hooked)

            after = scraper.once(everything_counted, "every request and hook run counted")
            scrapes = scraper.answered  # every request to /metrics, this one included
            api_calls = [0]

            def zone_counts_every_response() -> bool:
                zone = json.loads(fetch(port, "/api/9/http/server_zones/front")[2])
                answered = sent + hooked + scrapes + api_calls[0]  # before this call
                api_calls[0] += 1
                return zone["responses"]["2xx"] == answered

            wait_for(zone_counts_every_response, 10, "the server zone to count every response", 0.1)

    def counted(name: str, **labels: str) -> float:  # (the master's start cleared the figures)
        return total(after, name, **labels)

    assert counted("scriptlb_http_requests_total") == sent + hooked + scrapes
    assert counted("scriptlb_upstream_server_requests_total", upstream="backend") == sent
    assert counted("scriptlb_hook_runs_total", upstream="hooked", phase="balancer", outcome="ok") == hooked
    assert counted("scriptlb_hook_duration_seconds_count", upstream="hooked") == hooked
    assert counted("scriptlb_upstream_server_responses_total", upstream="backend", code="2xx") == sent
    assert counted("scriptlb_upstream_server_responses_total", code="5xx") == 0
    assert counted("scriptlb_upstream_server_response_time_seconds_count", upstream="backend") == sent
    buckets = "scriptlb_upstream_server_response_time_seconds_bucket"
    assert counted(buckets, upstream="backend", le="+Inf") == sent
    # a scrape's own response is counted in the next one
    responses = counted("scriptlb_http_responses_total", server_zone="front", code="2xx")
    assert responses == sent + hooked + scrapes - 1
    # both servers took a share, and the per-server series add up to the totals
    shares = [counted("scriptlb_upstream_server_requests_total", upstream="backend", server=b.addr)
              for b in bk]
    assert sum(shares) == sent and all(shares)
    assert total(after, "scriptlb_upstream_server_state") == 3
    assert total(after, "scriptlb_connections", state="accepted") >= sent + 2
    assert total(after, "scriptlb_connections", state="active") >= 1


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

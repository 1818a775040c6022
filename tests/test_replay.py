"""``scriptlb replay`` as a user runs it (the command, real files): log formats and inputs, the
peer model and its file, retries and outages, the outputs, and the errors."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, scriptlb_cmd

from scriptlb.replay.logs import LineParser, format_template, parse_tries
from scriptlb.replay.run import progress_bar

sys.path.insert(0, str(ROOT / "bench"))
from gen_access_log import FORMAT, generate

PEERS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
CONF = """events {{}}
http {{
    log_format day '{format}';
    {http}
    upstream backend {{
        {method}
        server 127.0.0.1:9001{args};
        server 127.0.0.1:9002{args};
        server 127.0.0.1:9003{args};
        {hook}
    }}
    server {{
        listen 127.0.0.1:8080;
        location / {{
            proxy_pass http://backend;
            {location}
        }}
    }}
}}
"""


def conf(
    tmp_path: Path,
    name: str = "rr.conf",
    *,
    hook: str = "",
    method: str = "",
    args: str = "",
    http: str = "",
    location: str = "",
) -> Path:
    path = tmp_path / name
    path.write_text(
        CONF.format(format=FORMAT, hook=hook, method=method, args=args, http=http, location=location)
    )
    return path


@pytest.fixture
def day_log(tmp_path: Path) -> Path:
    """Two hours of generated traffic (peer 9003 slower)."""
    path = tmp_path / "access.log"
    with path.open("w") as out:
        generate(2, 3, 7, out)
    return path


def replay(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        scriptlb_cmd("replay", *args), input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def figures(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    done = replay(*args, "--quiet", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: no progress, no summary line
    return json.loads(out.read_text())


def shares(result: dict) -> dict[str, float]:
    return {p["peer"]: p["share"] for p in result["peers"]}


# --------------------------------------------------------------------------- reading logs


def test_round_robin_over_a_log_and_the_table(tmp_path: Path, day_log: Path) -> None:
    rr = conf(tmp_path)
    done = replay("--conf", str(rr), "--log-format", "day", "--quiet", str(day_log))
    assert done.returncode == 0, done.stderr
    lines = len(day_log.read_text().splitlines())
    assert re.search(rf"^requests +{lines}$", done.stdout, re.MULTILINE), done.stdout
    for peer in PEERS:
        assert f"peer {peer}" in done.stdout
    result = figures(tmp_path, "--conf", str(rr), "--log-format", "day", str(day_log))["results"][0]
    assert result["requests"] == lines and result["tries"] >= lines
    assert all(abs(share - 1 / 3) < 0.01 for share in shares(result).values())
    latency = result["latency"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]


def test_combined_format_gz_and_stdin(tmp_path: Path) -> None:
    """nginx's default format: no upstream lists (a model file gives the latencies), one-second
    times (the requests of a second spread over it)."""
    lines = [
        f'10.0.0.{i % 9 + 1} - - [04/Dec/2026:23:10:{i // 10:02d} +0000] "GET /x/{i} HTTP/1.1" 200 5 "-" "ua"'
        for i in range(200)
    ]
    (tmp_path / "access.log.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"default": {"latency": "5ms"}}))
    rr = conf(tmp_path)
    from_gz = figures(tmp_path, "--conf", str(rr), "--model", str(model), str(tmp_path / "access.log.gz"))
    assert from_gz["requests"] == 200 and from_gz["trace_seconds"] == 19
    assert from_gz["results"][0]["latency"]["p50"] == pytest.approx(0.005)
    out = tmp_path / "stdin.json"
    done = replay(
        "--conf",
        str(rr),
        "--model",
        str(model),
        "--quiet",
        "--json",
        str(out),
        "-",
        stdin="\n".join(lines) + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["results"] == from_gz["results"]


def test_format_string_and_json_lines(tmp_path: Path) -> None:
    text = "\n".join(
        json.dumps(
            {
                "t": f"{1767225600 + i / 10:.3f}",
                "req": f"GET /j/{i} HTTP/1.1",
                "up": PEERS[i % 3],
                "us": "200",
                "ut": "0.004",
            }
        )
        for i in range(60)
    )
    (tmp_path / "json.log").write_text(text + "\n")
    result = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path)),
        "--log-format",
        '{"t":"$msec","req":"$request","up":"$upstream_addr","us":"$upstream_status",'
        '"ut":"$upstream_response_time"}',
        str(tmp_path / "json.log"),
    )
    assert result["requests"] == 60 and result["results"][0]["latency"]["p99"] == pytest.approx(0.004)


def test_parser_reads_nginx_lists_and_escapes() -> None:
    assert parse_tries("127.0.0.1:1, 127.0.0.1:2 : 127.0.0.1:3", "502, 504 : 200", "0.001, 3.000 : -") == [
        ("127.0.0.1:1", 502, 0.001),
        ("127.0.0.1:2", 504, 3.0),
        ("127.0.0.1:3", 200, None),
    ]
    parser = LineParser(format_template('"$request" $http_x_user_id', None))
    request = parser.request('"GET /a\\x22b HTTP/1.1" -', 1)
    assert request is not None and request.target == '/a"b' and request.headers == []
    assert parser.request("nonsense", 2) is None


# --------------------------------------------------------------------------- the model


def test_model_file_outage_causes_retries_in_its_window_only(tmp_path: Path, day_log: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("peers:\n  '127.0.0.1:9002':\n    outages:\n      - {from: 10m, to: 20m, status: 502}\n")
    retrying = conf(tmp_path, location="proxy_next_upstream error timeout http_502;")
    out = figures(
        tmp_path, "--conf", str(retrying), "--log-format", "day", "--model", str(model), str(day_log)
    )
    result = out["results"][0]
    failed = {p["peer"]: p["failures"] for p in result["peers"]}
    assert failed["127.0.0.1:9002"] > 0 and failed["127.0.0.1:9001"] == failed["127.0.0.1:9003"] == 0
    assert result["retries"] == failed["127.0.0.1:9002"] and result["error_responses"] == 0
    # without http_502 in proxy_next_upstream the 502s reach the clients; and more of them, as a
    # 502 passed through is no failure for max_fails (nginx): the peer is not rested
    passed = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path, "plain.conf")),
        "--log-format",
        "day",
        "--model",
        str(model),
        str(day_log),
    )["results"][0]
    assert passed["retries"] == 0 and passed["statuses"]["502"] > 2 * failed["127.0.0.1:9002"]


def test_model_toml_latency_makes_ewma_avoid_the_slow_peer(tmp_path: Path, day_log: Path) -> None:
    model = tmp_path / "model.toml"
    model.write_text(
        '[peers."127.0.0.1:9001"]\nlatency = "5ms"\n[peers."127.0.0.1:9002"]\nlatency = "5ms"\n'
        '[peers."127.0.0.1:9003"]\nlatency = {median = "100ms", p99 = "400ms"}\n'
    )
    ewma = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path, method="ewma;")),
        "--log-format",
        "day",
        "--model",
        str(model),
        str(day_log),
    )["results"][0]
    assert shares(ewma)["127.0.0.1:9003"] < 0.1


def test_learned_failures_and_max_fails(tmp_path: Path) -> None:
    """Peer 9003 failed (nginx's own 502, retried) on a third of its logged tries: the replay
    learns that rate; with max_fails=1 round robin rests it, so it gets fewer tries."""
    lines = []
    for i in range(600):
        peer = PEERS[i % 3]
        tries = (
            f"{peer}, {PEERS[0]} 502, 200 0.000, 0.002"
            if peer == PEERS[2] and i % 9 == 2
            else f"{peer} 200 0.002"
        )
        lines.append(f'1.2.3.4 [{1767225600 + i * 0.05:.3f}] "GET /{i} HTTP/1.1" 200 0.002 "-" {tries}')
    (tmp_path / "log").write_text("\n".join(lines) + "\n")
    plain = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path, args=" max_fails=0")),
        "--log-format",
        "day",
        str(tmp_path / "log"),
    )["results"][0]
    resting = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path, "mf.conf", args=" max_fails=1 fail_timeout=1s")),
        "--log-format",
        "day",
        str(tmp_path / "log"),
    )["results"][0]
    failures = {p["peer"]: p["failures"] for p in plain["peers"]}
    assert 40 < failures[PEERS[2]] < 95 and failures[PEERS[0]] == 0  # about 1 in 3 of ~200 tries
    assert plain["error_responses"] == 0  # every failure retried ("error", default proxy_next_upstream)
    assert shares(resting)[PEERS[2]] < shares(plain)[PEERS[2]] - 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("peers: {'127.0.0.1:9001': {latency: fast}}", "peers.127.0.0.1:9001.latency: a duration expected"),
        ("peers: {'127.0.0.1:9001': {error_rate: 2}}", "error_rate: a number from 0 to 1 expected"),
        ("peers: {'127.0.0.1:9001': {outages: [{from: 5, to: 1}]}}", "'to' must come after 'from'"),
        ("peers: {'127.0.0.1:9001': {speed: 1}}", "unknown field(s) speed"),
        ("[1, 2]", "expected a mapping"),
    ],
)
def test_bad_model_file(tmp_path: Path, day_log: Path, text: str, message: str) -> None:
    model = tmp_path / "model.yml"
    model.write_text(text)
    done = replay("--conf", str(conf(tmp_path)), "--log-format", "day", "--model", str(model), str(day_log))
    assert done.returncode == 1 and message in done.stderr and str(model) in done.stderr, done.stderr


# --------------------------------------------------------------------------- outputs, errors


def test_compare_with_fastest_first_and_the_plot(tmp_path: Path, day_log: Path) -> None:
    rr = conf(tmp_path)
    ff = conf(
        tmp_path,
        "ff.conf",
        args=" max_fails=0",
        http="python_shared_dict fastest_first 1m;",
        location=f"log_by_python_file {ROOT}/hooks/fastest_first.py;",
    )
    png, out = tmp_path / "shares.png", tmp_path / "out.json"
    done = replay(
        "--conf",
        str(rr),
        "--compare",
        str(ff),
        "--log-format",
        "day",
        "--quiet",
        "--json",
        str(out),
        "--plot",
        str(png),
        str(day_log),
    )
    assert done.returncode == 0, done.stderr
    assert "rr.conf" in done.stdout and "ff.conf" in done.stdout and "first peer differs" in done.stdout
    both = json.loads(out.read_text())
    slow = "127.0.0.1:9003"
    assert shares(both["results"][1])[slow] < shares(both["results"][0])[slow] - 0.1
    assert both["results"][1]["latency"]["p50"] < both["results"][0]["latency"]["p50"]
    assert both["moved_requests"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hook_fallbacks_are_counted(tmp_path: Path, day_log: Path) -> None:
    hook = tmp_path / "flaky.py"
    hook.write_text(
        "if ngx.var.uri.endswith('7'):\n    1 / 0\n"
        "balancer.set_current_peer(upstream.get_primary_peers()[0]['name'])\n"
    )
    result = figures(
        tmp_path,
        "--conf",
        str(conf(tmp_path, hook=f"balancer_by_python_file {hook};")),
        "--log-format",
        "day",
        str(day_log),
    )["results"][0]
    assert result["fallbacks"]["runtime_error"] > 0 and result["hook_log_lines"] > 0
    assert shares(result)["127.0.0.1:9001"] > 0.8


def test_progress_bar() -> None:
    stream = io.StringIO()
    draw = progress_bar(stream)
    draw(10, 100)
    draw(100, 100)
    assert stream.getvalue().endswith("] 100/100 requests\n") and "\r" in stream.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-format", "nosuch"], 'unknown log format "nosuch"'),
        (["--log-format", "$nosuch_var"], 'unknown "nosuch_var" variable'),
        (["--log-format", "$uri$status"], "cannot be told apart"),
        (["--upstream", "nosuch"], 'no upstream "nosuch"'),
    ],
)
def test_errors_exit_1_with_a_reason(tmp_path: Path, day_log: Path, args: list[str], message: str) -> None:
    done = replay("--conf", str(conf(tmp_path)), *args, str(day_log))
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_bad_config_is_reported_at_file_line(tmp_path: Path, day_log: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("events {}\nhttp {\n    upstream b { server 127.0.0.1:1 weight=x; }\n}\n")
    done = replay("--conf", str(bad), str(day_log))
    assert done.returncode == 1 and f"in {bad}:3" in done.stderr, done.stderr
    done = replay("--conf", str(conf(tmp_path)), "--log-format", "day", str(tmp_path / "missing.log"))
    assert done.returncode == 1 and "missing.log" in done.stderr


def test_a_log_without_tries_warns(tmp_path: Path) -> None:
    line = '10.0.0.1 - - [04/Dec/2026:23:10:18 +0000] "GET / HTTP/1.1" 200 5 "-" "ua"\n'
    (tmp_path / "combined.log").write_text(line * 3)
    done = replay("--conf", str(conf(tmp_path)), "--quiet", str(tmp_path / "combined.log"))
    assert done.returncode == 0 and "warning: the log records no $upstream_addr" in done.stderr


def test_no_request_in_the_log(tmp_path: Path) -> None:
    (tmp_path / "empty.log").write_text("garbage\n")
    done = replay("--conf", str(conf(tmp_path)), str(tmp_path / "empty.log"))
    assert done.returncode == 1 and "no request found in 1 lines" in done.stderr


def test_failures_are_learned_per_window_of_the_trace() -> None:
    """A peer that failed for two minutes only fails in those two minutes of the replay."""
    import random

    from scriptlb.replay.model import WINDOW, Learner

    learner = Learner(random.Random(1), frozenset())
    start = 1_767_225_600.0
    for i in range(6000):  # ten minutes, 10 requests a second
        when = start + i / 10
        bad = 120 <= when - start < 240 and i % 2
        retried = [(PEERS[1], 502, 0.001), (PEERS[0], 200, 0.002)]
        learner.add(retried if bad else [(PEERS[1], 200, 0.002)], when)
    model = learner.models()[PEERS[1]]
    rng = random.Random(2)
    failing = [t for t in range(0, 600, 5) if any(model.failure_at(start + t, t, rng) for _ in range(20))]
    assert failing and all(120 <= t < 240 + WINDOW for t in failing)
    assert min(failing) < 130 and max(failing) >= 230


def test_only_the_upstreams_requests_are_replayed(tmp_path: Path) -> None:
    """Requests the config routes elsewhere (another location, a return, another server by
    Host) are counted, not replayed: the config's own server and location matching."""
    text = CONF.format(
        format=FORMAT.replace('"$http_x_user_id"', '"$host"'),
        http="",
        method="",
        args="",
        hook="",
        location="",
    ).replace(
        "        location / {",
        "        location = /health { return 200; }\n"
        "        location /static/ { proxy_pass http://127.0.0.1:9999; }\n        location / {",
    )
    text = text.replace(
        "    server {\n        listen 127.0.0.1:8080;",
        "    server { listen 127.0.0.1:8080; server_name other.example; location / { return 204; } }\n"
        "    server {\n        listen 127.0.0.1:8080 default_server;",
        1,
    )
    (tmp_path / "routes.conf").write_text(text)
    uris = [
        ("/health", "a.example"),
        ("/static/x.css", "a.example"),
        ("/api", "a.example"),
        ("/api", "other.example"),
        ("/", "a.example"),
    ]
    lines = [
        f'1.2.3.4 [{1767225600 + i:.3f}] "GET {uri} HTTP/1.1" 200 0.001 "{host}" {PEERS[0]} 200 0.001'
        for i, (uri, host) in enumerate(uris)
    ]
    (tmp_path / "log").write_text("\n".join(lines) + "\n")
    result = figures(
        tmp_path,
        "--conf",
        str(tmp_path / "routes.conf"),
        "--upstream",
        "backend",
        "--log-format",
        "day",
        str(tmp_path / "log"),
    )["results"][0]
    assert (result["requests"], result["other_locations"]) == (2, 3)


def test_rate_and_capacity(tmp_path: Path, day_log: Path) -> None:
    """--rate replaces the recorded times; a peer past its capacity answers more slowly."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"peers": {p: {"latency": "10ms", "capacity": 2} for p in PEERS}}))
    rr = str(conf(tmp_path))
    calm = figures(
        tmp_path, "--conf", rr, "--log-format", "day", "--model", str(model), "--rate", "10", str(day_log)
    )
    busy = figures(
        tmp_path, "--conf", rr, "--log-format", "day", "--model", str(model), "--rate", "2000", str(day_log)
    )
    assert calm["results"][0]["latency"]["p99"] == pytest.approx(0.010)
    assert busy["results"][0]["latency"]["p50"] > 0.010


@pytest.mark.parametrize(
    ("code", "kept"),
    [
        ('balancer.set_current_peer(["127.0.0.1:9001"][ngx.crc32_short(ngx.var.uri) % 1])', False),
        ('balancer.set_current_peer(upstream.get_primary_peers()[0]["name"])', True),
        ('balancer.set_current_peer(ngx.upstream.get_primary_peers()[0]["name"])', True),
        ('u = getattr(ngx, "up" + "stream")', True),
        ("import ring", True),
        (
            "def pick():\n    return upstream\n"
            "balancer.set_current_peer(pick().get_primary_peers()[0]['name'])",
            True,
        ),
    ],
)
def test_statistics_kept_only_for_hooks_that_can_read_them(tmp_path: Path, code: str, kept: bool) -> None:
    """Unobservable statistics are not kept in a replay (they cost half of it for a cheap hook)."""
    from scriptlb.config import load
    from scriptlb.replay.offline import Offline

    block = "balancer_by_python_block {\n" + textwrap.indent(code, "            ") + "\n        }"
    path = conf(tmp_path, hook=block)
    with Offline(load(str(path)), precompile=False) as offline:
        assert (offline.stats is not None) == kept

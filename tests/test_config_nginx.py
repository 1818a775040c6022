"""Same config, same verdict: scriptlb's loader against a real ``nginx -t``.

Each case is a config that both must refuse (or accept) with the same message, file and line.
Skipped when nginx is not installed (``scripts/install-test-tools`` installs it).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import free_ports
from nginx_oracle import NGINX

from scriptlb.config import ConfigError, load

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/install-test-tools)"),
]

# nginx prints either "nginx: [emerg] msg" or, once its log is open, "DATE TIME [emerg] PID#TID: msg"
_NGINX_LINE = re.compile(r"^(?:nginx: |\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )\[(\w+)\] (?:\d+#\d+: )?(.*)$")


GLOBALS = "error_log stderr; pid logs/n.pid;"  # keep nginx's files inside the test's prefix


def nginx_verdict(conf: Path, prefix: Path, globals_: str = GLOBALS) -> str:
    assert NGINX is not None
    result = subprocess.run(
        [NGINX, "-t", "-q", "-p", f"{prefix}/", "-c", str(conf), "-g", globals_],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in result.stderr.splitlines():
        m = _NGINX_LINE.match(line)
        if m and m.group(1) == "emerg":
            return f"[emerg] {m.group(2)}"
    assert result.returncode == 0, result.stderr
    return "ok"


def scriptlb_verdict(conf: Path, prefix: Path, globals_: str = GLOBALS) -> str:
    try:
        load(str(conf), str(prefix), globals_)
    except ConfigError as e:
        return str(e)
    return "ok"


CASES = [
    # syntax
    "events {}\n}\n",
    "events {\n\n",
    "events {}\nworker_processes 1",
    'events {}\nworker_processes "1"x;\n',
    "events {}\n;\n",
    "events {}\nworker_processes 1 }\n",
    # dispatch
    "events {}\nfooo on;\n",
    "events {}\nevents;\n",
    "events {}\nworker_processes {}\n",
    "events {}\nworker_processes 1 2;\n",
    "events {}\nhttp { listen 80; }\n",
    "events {}\nhttp { server { location / { client_header_timeout 1s; } } }\n",
    "events {}\ninclude nofile.conf;\n",
    # values
    "events {}\ndaemon maybe;\n",
    "events {}\ndaemon off;\ndaemon on;\n",
    "events {}\nworker_processes x;\n",
    "events { worker_connections x; }\n",
    "events {}\nerror_log logs/e.log loud;\n",
    "events {}\nhttp { proxy_read_timeout 5x; }\n",
    "events {}\nhttp { proxy_read_timeout 1y; }\n",
    "events {}\nhttp { proxy_read_timeout 1m30s; }\n",
    "events {}\nhttp { client_max_body_size 1.5m; }\n",
    "events {}\nhttp { client_max_body_size 1g; }\n",
    "events {}\nhttp { large_client_header_buffers 4 1g; }\n",
    "events {}\nhttp { keepalive_requests x; }\n",
    "events {}\nhttp { keepalive_timeout 10s 5x; }\n",
    "events {}\nhttp { proxy_http_version 2.0; }\n",
    "events {}\nhttp { proxy_next_upstream error foo; }\n",
    "events {}\nhttp { proxy_next_upstream_tries -1; }\n",
    "events {}\nhttp { proxy_buffering maybe; }\n",
    "events {}\nhttp { server { location / { proxy_set_header X ${host; } } }\n",
    'events {}\nhttp { server { location / { proxy_set_header X "$"; } } }\n',
    # upstreams
    "events {}\nhttp { upstream a {\n} }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1; }\nupstream a { server 127.0.0.1; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 backup; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 weight=0; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 fail_timeout=500ms; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 bogus; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1:0; } }\n",
    "events {}\nhttp { upstream a { server nosuchhost.invalid:8080; } }\n",
    "events {}\nhttp { upstream a { server unix:; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1; keepalive 0; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1; keepalive 1; keepalive 2; } }\n",
    "events {}\nhttp { upstream a { least_conn x; server 127.0.0.1; } }\n",
    "events {}\nhttp { upstream a { hash $uri x; server 127.0.0.1; } }\n",
    "events {}\nhttp { upstream a { hash; server 127.0.0.1; } }\n",
    "events {}\nhttp { upstream a { random two foo; server 127.0.0.1; } }\n",
    "events {}\nhttp { upstream a { ip_hash; server 127.0.0.1 backup; } }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 backup; server 127.0.0.1; hash $uri; } }\n",
    # servers, locations, proxy_pass
    "events {}\nhttp { server { listen 99999; } }\n",
    "events {}\nhttp { server { listen 127.0.0.1:; } }\n",
    "events {}\nhttp { server { listen 80 bogus; } }\n",
    "events {}\nhttp { server { listen 80 backlog=x; } }\n",
    "events {}\nhttp { server { listen 8080; listen 8080; } }\n",
    "events {}\nhttp {\nserver { listen 127.0.0.1:80 default_server;"
    " }\nserver { listen 127.0.0.1:80 default; }\n}\n",
    "events {}\nhttp { server { location / {} location / {} } }\n",
    "events {}\nhttp { server { location @x b {} } }\n",
    "events {}\nhttp { server { location / { proxy_pass http://nosuchhost.invalid; } } }\n",
    "events {}\nhttp { server { location / { proxy_pass ftp://127.0.0.1; } } }\n",
    "events {}\nhttp { server { location / { proxy_pass http://127.0.0.1:99999; } } }\n",
    "events {}\nhttp { upstream u { server 127.0.0.1; } server"
    " { location / { proxy_pass http://u:8080; } } }\n",
    "events {}\nhttp { server { location ~ /x { proxy_pass http://127.0.0.1:9000/a/; } } }\n",
    "events {}\nhttp { server { location / { return abc; } } }\n",
    "events {}\nhttp { server { location / { return 200 a b; } } }\n",
    # logs
    'events {}\nhttp { log_format combined "$uri"; }\n',
    'events {}\nhttp { log_format x escape=bad "$uri"; }\n',
    "events {}\nhttp { access_log logs/a.log nosuchfmt; }\n",
    "events {}\nhttp { access_log logs/a.log combined buffer=x; }\n",
    "events {}\nhttp { access_log logs/a.log combined flush=1s; }\n",
    "events {}\nhttp { access_log off combined; }\n",
    "events {}\nhttp { upstream a { server 127.0.0.1 BACKUP; } }\n",
    "events {}\nhttp { server { listen 80 DEFAULT_SERVER; } }\n",
    # client heads and bodies, upstream buffers (merge-time checks point at the http block's end)
    "events {}\nhttp {\n server {\n  location / {\n   proxy_buffers 1 4k;\n  }\n }\n}\n",
    "events {}\nhttp {\n server {\n  location / {\n   proxy_busy_buffers_size 2k;\n  }\n }\n}\n",
    "events {}\nhttp {\n proxy_buffers 4 4k;\n proxy_busy_buffers_size 16k;\n}\n",
    "events {}\nhttp {\n server {\n  proxy_buffers 4 0;\n }\n}\n",
    "events {}\nhttp { proxy_buffer_size 16k; }\n",
    "events {}\nhttp { proxy_buffer_size 8k; proxy_buffers 4 8k; proxy_busy_buffers_size 16k; }\n",
    "events {}\nhttp { server { location / { client_body_in_file_only foo; } } }\n",
    "events {}\nhttp { server { location / { client_body_in_file_only clean; } } }\n",
    "events {}\nhttp { client_body_temp_path a 1 2 3 4; }\n",
    "events {}\nhttp { client_body_temp_path a 1 0; }\n",
    "events {}\nhttp { client_body_temp_path body 1 3; client_body_buffer_size 0; }\n",
    "events {}\nhttp { server { location / { client_header_buffer_size 1k; } } }\n",
    "events {}\nhttp { server { client_header_buffer_size 2k; underscores_in_headers on; } }\n",
    "events {}\nhttp { ignore_invalid_headers maybe; }\n",
    "events {}\nhttp { server { location / { underscores_in_headers on; } } }\n",
    "events {}\nhttp { client_body_in_single_buffer on; client_body_in_single_buffer off; }\n",
    # accepted by both
    "events {}\nhttp { proxy_next_upstream error TimeOut; proxy_buffering OFF; }\n",
    "events {}\nhttp { server { listen 8080; location / { return 200 'ok'; } } }\n",
    "events {}\nhttp { upstream u { server 127.0.0.1:9001 weight=5"
    " max_fails=3 fail_timeout=1y; keepalive 4; } }\n",
]


@pytest.mark.parametrize("text", CASES)
def test_same_verdict_as_nginx(tmp_path: Path, text: str) -> None:
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "conf" / "t.conf"
    conf.parent.mkdir()
    conf.write_text(text)
    assert scriptlb_verdict(conf, tmp_path) == nginx_verdict(conf, tmp_path)


def test_shipped_configs_pass_nginx_too(tmp_path: Path) -> None:
    """The default config and the plain example are real nginx configs (scriptlb's "stdout"
    access-log target is nginx's /dev/stdout)."""
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "logs").mkdir()
    for name in ("scriptlb.conf", "examples/nginx-like.conf"):
        text = (root / "conf" / name).read_text().replace("access_log stdout", "access_log /dev/stdout")
        conf = tmp_path / Path(name).name
        conf.write_text(text)
        assert nginx_verdict(conf, tmp_path, "error_log stderr;") == "ok"
        assert scriptlb_verdict(conf, tmp_path, "error_log stderr;") == "ok"


def _get(port: int, path: str) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


ESCAPES = {
    "/a": r'"q\"d\\b\tt\nn\rr\dx"',
    "/b": r"""'single \'q\' "d" \\ \n'""",
    "/c": r"bare\"word\;semi\ space",
    "/d": r'"{braces} #hash ;semi"',
}


def test_quoting_and_escapes_give_the_bytes_nginx_serves(tmp_path: Path) -> None:
    """Each string goes through `return 200 STRING;`: what nginx sends is what we parsed."""
    import time

    assert NGINX is not None
    (port,) = free_ports(1)
    (tmp_path / "logs").mkdir()
    locations = "".join(f"location {path} {{ return 200 {raw}; }}\n" for path, raw in ESCAPES.items())
    conf = tmp_path / "t.conf"
    conf.write_text(
        "daemon off; master_process off; error_log stderr; pid logs/n.pid;\nevents {}\n"
        f"http {{ access_log off; server {{ listen 127.0.0.1:{port};\n{locations}}} }}\n"
    )
    ours = load(str(conf), str(tmp_path))
    assert ours.http is not None
    expected = {loc.pattern: loc.return_.text.static for loc in ours.http.servers[0].locations if loc.return_}
    proc = subprocess.Popen([NGINX, "-p", f"{tmp_path}/", "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until nginx accepts connections
            try:
                served = {path: _get(port, path).decode() for path in ESCAPES}
                break
            except OSError:
                assert proc.poll() is None, proc.stderr and proc.stderr.read()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert served == expected
    assert served["/a"] == 'q"d\\b\tt\nn\rr\\dx'

"""$balancer_trace and the X-Balancer-Trace header through real sockets: a hook that sets the
peer, a retry after a 502 (what the hook read of the failure), a hook that raises, one over its
budget, one that sets no peer, ngx.exit, the built-in methods; the variable in an access log and
in a log_by_python hook; the header only for allowed clients that ask, never a peer's own."""

from __future__ import annotations

import http.client
import re
import socket
from pathlib import Path

import pytest
from helpers import Backends, HttpConnection, Scriptlb, closed_port, get, load_conf, respond, wait_for

from scriptlb.config import load
from scriptlb.config.errors import ConfigError
from scriptlb.process.worker import WorkerThread

# WHO PEER TIME LAST, as docs/hooks.md describes it
ENTRY = re.compile(r"^(\S+) (\S+) (-|\d+us) (-|last=none|last=\w+/\d+)$")
ASK = {"X-Balancer-Trace": "1"}


def conf(upstream_body: str, location_extra: str = "", http_extra: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log notice;
http {{
    log_format trace '$upstream_addr|$upstream_status|$balancer_trace';
    {http_extra}
    upstream u {{
        {upstream_body}
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        access_log {{tmp}}/access.log trace;
        location / {{
            proxy_pass http://u;
            proxy_next_upstream error timeout http_502;
            {location_extra}
        }}
    }}
}}
"""


def hook_upstream(peers: list[str], code: str, extra: str = "") -> str:
    servers = "".join(f"server {peer};\n" for peer in peers)
    return f"{servers}{extra}\nbalancer_by_python_block {{\n{code}\n}}"


def logged(tmp_path: Path, count: int) -> list[list[str]]:
    path = tmp_path / "access.log"
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= count, what="access log lines")
    return [line.split("|") for line in path.read_text().splitlines()]


def entries(trace: str) -> list[tuple[str, ...]]:
    found = []
    for entry in trace.split(", "):
        match = ENTRY.match(entry)
        assert match is not None, f"unparseable trace entry {entry!r} in {trace!r}"
        found.append(match.groups())
    return found


def serve(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


# --------------------------------------------------------------------------- who chose the peer


def test_a_hook_that_sets_the_peer(tmp_path: Path) -> None:
    with Backends(respond(body=b"a")) as bk, \
            serve(conf(hook_upstream([bk[0].addr], f'balancer.set_current_peer("{bk[0].addr}")')),
                  tmp_path) as lb:
        assert get(lb.port).status == 200
        (line,) = logged(tmp_path, 1)
    assert line[0] == bk[0].addr
    ((who, peer, spent, last),) = entries(line[2])
    assert (who, peer, last) == ("hook", bk[0].addr, "-")  # the hook never asked for a failure
    assert spent.endswith("us") and int(spent[:-2]) >= 0


def test_a_hook_that_sets_a_down_peer_gets_it_and_the_trace_says_so(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b")) as bk:
        code = f'balancer.set_current_peer("{bk[1].addr}")'
        upstream = f"server {bk[0].addr};\nserver {bk[1].addr} down;\nbalancer_by_python_block {{\n{code}\n}}"
        with serve(conf(upstream), tmp_path) as lb:
            assert get(lb.port).body == b"b"
            (line,) = logged(tmp_path, 1)
    ((who, peer, _spent, last),) = entries(line[2])
    assert (who, peer, last) == ("hook(down)", bk[1].addr, "-")
    log = (tmp_path / "error.log").read_text()
    assert re.search(rf"\[warn\] \d+#0: \*\d+ balancer_by_python chose down peer {re.escape(bk[1].addr)} "
                     r"while connecting to upstream, client: 127\.0\.0\.1", log)


def test_a_retry_after_a_502_shows_what_the_hook_read(tmp_path: Path) -> None:
    with Backends(respond(502, b"bad"), respond(body=b"good")) as bk:
        code = (f"state, status = balancer.get_last_failure()\n"
                f'balancer.set_current_peer("{bk[0].addr}" if state is None else "{bk[1].addr}")')
        with serve(conf(hook_upstream([bk[0].addr, bk[1].addr], code)), tmp_path) as lb:
            assert get(lb.port).body == b"good"
            (line,) = logged(tmp_path, 1)
    first, second = entries(line[2])
    assert first[0:2] == ("hook", bk[0].addr) and first[3] == "last=none"
    assert second[0:2] == ("hook(retry)", bk[1].addr) and second[3] == "last=failed/502"
    assert line[0] == f"{bk[0].addr}, {bk[1].addr}" and line[1] == "502, 200"  # same tries, same order


@pytest.mark.parametrize(("code", "reason"), [
    ('raise ValueError("boom")', "runtime_error"),
    ("while True:\n    pass", "timeout"),
    ("x = 1", "no_peer"),
    ("ngx.exit(200)", "exit"),
])
def test_a_failing_hook_falls_back_and_says_why(tmp_path: Path, code: str, reason: str) -> None:
    # a short budget for the hook that must time out; a roomy one for the others, which a loaded
    # machine's preemption would otherwise time out now and then (another reason in the trace)
    budget = "10ms" if reason == "timeout" else "1s"
    with Backends(respond(body=b"a")) as bk, \
            serve(conf(hook_upstream([bk[0].addr], code, f"balancer_by_python_timeout {budget};")),
                  tmp_path) as lb:
        assert get(lb.port).status == 200
        (line,) = logged(tmp_path, 1)
    ((who, peer, spent, last),) = entries(line[2])
    assert (who, peer, last) == (f"fallback({reason})", bk[0].addr, "-")
    if reason == "timeout":
        assert int(spent[:-2]) >= 10_000  # the budget was spent before the fallback
    else:
        assert spent != "-"


def test_a_hook_that_ends_the_request(tmp_path: Path) -> None:
    with Backends(respond(body=b"a")) as bk, \
            serve(conf(hook_upstream([bk[0].addr], "ngx.exit(403)"),
                       "balancer_trace_header on; balancer_trace_allow 127.0.0.1;"), tmp_path) as lb:
        response = get(lb.port, headers=ASK)
        assert response.status == 403
        (line,) = logged(tmp_path, 1)
    assert line[0] == "-"  # no try, as $upstream_addr says
    ((who, peer, _spent, _last),) = entries(line[2])
    assert (who, peer) == ("exit(403)", "-")
    assert response.header("X-Balancer-Trace") == line[2]  # also on our own error page
    assert not bk[0].requests


@pytest.mark.parametrize("method", ["", "least_conn;", "hash $request_uri;", "ewma;"])
def test_the_built_in_method_names_itself(tmp_path: Path, method: str) -> None:
    expected = method.split(" ")[0].rstrip(";") or "round_robin"
    with Backends(respond(body=b"a"), respond(body=b"b")) as bk, \
            serve(conf(f"{method} server {bk[0].addr}; server {bk[1].addr};"), tmp_path) as lb:
        for _ in range(2):
            assert get(lb.port).status == 200
        lines = logged(tmp_path, 2)
    for line in lines:
        ((who, peer, spent, last),) = entries(line[2])
        assert (who, peer, spent, last) == (expected, line[0], "-", "-")


def test_a_dead_peer_then_the_next_and_no_live_upstreams(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    with Backends(respond(body=b"a")) as bk, \
            serve(conf(f"server {dead}; server {bk[0].addr};"), tmp_path) as lb:
        assert get(lb.port).status == 200
        (line,) = logged(tmp_path, 1)
    trace = entries(line[2])
    assert [e[1] for e in trace] == line[0].split(", ")
    assert {e[0] for e in trace} == {"round_robin"}


def test_the_variable_in_a_log_hook_equals_the_access_log(tmp_path: Path) -> None:
    log_hook = 'log_by_python_block { ngx.log(ngx.NOTICE, "trace=[", ngx.var.balancer_trace, "]") }'
    with Backends(respond(502, b"bad"), respond(body=b"good")) as bk:
        code = (f"state, status = balancer.get_last_failure()\n"
                f'balancer.set_current_peer("{bk[0].addr}" if state is None else "{bk[1].addr}")')
        with serve(conf(hook_upstream([bk[0].addr, bk[1].addr], code), http_extra=log_hook), tmp_path) as lb:
            assert get(lb.port).status == 200
            (line,) = logged(tmp_path, 1)
            error_log = tmp_path / "error.log"
            wait_for(lambda: "trace=[" in error_log.read_text(), what="the log hook's line")
    assert f"trace=[{line[2]}]" in error_log.read_text()
    assert len(entries(line[2])) == 2


def test_no_proxying_no_trace(tmp_path: Path) -> None:
    returned = 'location = /r { return 200 "x"; }\n location / {'
    text = conf("server 127.0.0.1:1;").replace("location / {", returned)
    with serve(text, tmp_path) as lb:
        assert get(lb.port, "/r").status == 200
        (line,) = logged(tmp_path, 1)
    assert line[2] == "-"  # not found, as $upstream_addr


# --------------------------------------------------------------------------- the header


def header_conf(peer: str, allow: str) -> str:
    return conf(f"server {peer};", f"balancer_trace_header on; {allow}")


def test_the_header_goes_to_allowed_clients_that_ask_only(tmp_path: Path) -> None:
    spoofed = {"X-Balancer-Trace": "hook 6.6.6.6:1 1us -"}  # a peer's own header is not ours
    with Backends(respond(body=b"a", headers=spoofed)) as bk, \
            serve(header_conf(bk[0].addr, "balancer_trace_allow 10.0.0.0/8 127.0.0.0/8 ::1;"),
                  tmp_path) as lb:
        with HttpConnection(lb.port) as client:
            asked = client.request(headers=ASK)
            not_asked = client.request()
            asked_wrong = client.request(headers={"X-Balancer-Trace": "yes"})
        lines = logged(tmp_path, 3)
    assert asked.header("X-Balancer-Trace") == lines[0][2] == f"round_robin {bk[0].addr} - -"
    assert [value for name, value in asked.headers if name.lower() == "x-balancer-trace"] == [lines[0][2]]
    assert [r.header("X-Balancer-Trace") for r in (not_asked, asked_wrong)] == [None, None]


def test_the_header_is_refused_to_other_addresses(tmp_path: Path) -> None:
    spoofed = {"X-Balancer-Trace": "hook 6.6.6.6:1 1us -"}
    with Backends(respond(body=b"a", headers=spoofed)) as bk, \
            serve(header_conf(bk[0].addr, "balancer_trace_allow 10.0.0.0/8 ::1;"), tmp_path) as lb:
        response = get(lb.port, headers=ASK)
    assert response.status == 200 and response.header("X-Balancer-Trace") is None


def test_without_an_allow_list_nobody_gets_it(tmp_path: Path) -> None:
    with Backends(respond(body=b"a")) as bk, serve(header_conf(bk[0].addr, ""), tmp_path) as lb:
        assert get(lb.port, headers=ASK).header("X-Balancer-Trace") is None


def test_header_off_passes_the_peers_header_untouched(tmp_path: Path) -> None:
    with Backends(respond(body=b"a", headers={"X-Balancer-Trace": "theirs"})) as bk, \
            serve(conf(f"server {bk[0].addr};"), tmp_path) as lb:
        assert get(lb.port, headers=ASK).header("X-Balancer-Trace") == "theirs"  # plain proxying


def test_the_header_on_our_502_after_the_tries(tmp_path: Path) -> None:
    dead = [f"127.0.0.1:{closed_port()}" for _ in range(2)]
    text = conf(f"server {dead[0]}; server {dead[1]};",
                "balancer_trace_header on; balancer_trace_allow all;")
    with serve(text, tmp_path) as lb:
        response = get(lb.port, headers=ASK)
        (line,) = logged(tmp_path, 1)
    assert response.status == 502
    assert response.header("X-Balancer-Trace") == line[2]
    assert [e[1] for e in entries(line[2])] == line[0].split(", ")


# --------------------------------------------------------------------------- configuration


def load_text(tmp_path: Path, text: str) -> None:
    conf_file = tmp_path / "t.conf"
    conf_file.write_text(text)
    load(str(conf_file), str(tmp_path))


def test_allow_lists_are_nginx_address_lists(tmp_path: Path) -> None:
    conf_file = tmp_path / "t.conf"
    conf_file.write_text("events {} http {\n balancer_trace_allow 10.1.2.3/8 ::1 unix:;\n"
                         " server { listen 127.0.0.1:1; balancer_trace_header on;\n"
                         "  location / { return 200; }\n"
                         "  location /x { balancer_trace_allow 192.168.0.0/16; balancer_trace_header off; }\n"
                         " } }\n")
    http = load(str(conf_file), str(tmp_path)).http
    assert http is not None
    inherited, inner = http.servers[0].locations
    assert (inherited.trace_header, inherited.trace_allow) == (True, ("10.0.0.0/8", "::1/128", "unix:"))
    assert (inner.trace_header, inner.trace_allow) == (False, ("192.168.0.0/16",))


@pytest.mark.parametrize(("line", "error"), [
    ("balancer_trace_allow 10.0.0.300;", 'invalid parameter "10.0.0.300"'),
    ("balancer_trace_allow;", 'invalid number of arguments in "balancer_trace_allow" directive'),
    ("balancer_trace_header yes;", 'invalid value "yes" in "balancer_trace_header" directive, it must be'),
])
def test_bad_lines_fail_at_their_line(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, f"events {{}}\nhttp {{\n{line}\n}}\n")
    assert error in str(caught.value) and str(caught.value).endswith("t.conf:3")


@pytest.mark.parametrize(("body", "who"), [
    ("server 127.0.0.1:1 down; server 127.0.0.1:2 down;", "round_robin"),
    (hook_upstream(["127.0.0.1:1 down"], "x = 1"), "fallback(no_peer)"),
])
def test_no_live_upstreams_shows_the_upstreams_name(tmp_path: Path, body: str, who: str) -> None:
    with serve(conf(body), tmp_path) as lb:
        assert get(lb.port).status == 502
        (line,) = logged(tmp_path, 1)
    ((found_who, peer, _spent, last),) = entries(line[2])
    assert (found_who, peer, last) == (who, "u", "-") and line[0] == "u"


class _Client:
    def __init__(self, remote_addr: str) -> None:
        self.remote_addr = remote_addr


@pytest.mark.parametrize(("networks", "address", "allowed"), [
    (["::1/128", "10.0.0.0/8"], "::1", True),
    (["::1/128", "10.0.0.0/8"], "::2", False),
    (["::1/128", "10.0.0.0/8"], "10.9.8.7", True),
    (["::1/128", "10.0.0.0/8"], "::ffff:10.9.8.7", True),  # IPv4-mapped: the IPv4 list, as nginx
    (["::1/128", "10.0.0.0/8"], "127.0.0.1", False),
    (["::1/128", "10.0.0.0/8"], "unix:", False),
    (["unix:"], "unix:", True),
    (["all"], "2001:db8::1", True),
    ([], "127.0.0.1", False),  # no list: nobody
])
def test_who_is_allowed(networks: list[str], address: str, allowed: bool) -> None:
    from scriptlb.request.access import address_matcher

    assert address_matcher(networks)(_Client(address)) is allowed


def _ipv6_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _ask_over_ipv6(port: int) -> str | None:
    client = http.client.HTTPConnection("::1", port, timeout=10)
    try:
        client.request("GET", "/", headers=ASK)
        response = client.getresponse()
        response.read()
        return response.getheader("X-Balancer-Trace")
    finally:
        client.close()


@pytest.mark.parametrize(("allow", "expected"), [("::1", True), ("127.0.0.1 fe80::/10", False)])
def test_an_ipv6_client_against_the_allow_list(tmp_path: Path, allow: str, expected: bool) -> None:
    try:
        sock = _ipv6_listener()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = sock.getsockname()[1]
    with Backends(respond(body=b"a")) as bk:
        text = header_conf(bk[0].addr, f"balancer_trace_allow {allow};").replace(
            "listen 127.0.0.1:{port0};", f"listen [::1]:{port};").replace("{tmp}", str(tmp_path))
        main_conf = load_conf(text, tmp_path)
        assert main_conf.http is not None
        listeners = {main_conf.http.servers[0].listens[0].key: sock}
        thread = WorkerThread(main_conf, listeners)
        thread.start()
        try:
            found = _ask_over_ipv6(port)
        finally:
            thread.stop()
            sock.close()
    assert (found == f"round_robin {bk[0].addr} - -") if expected else found is None

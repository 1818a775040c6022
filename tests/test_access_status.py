"""allow/deny, auth_basic and stub_status: config checks, behaviour, and nginx side by side."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from pathlib import Path

import bcrypt
import pytest
from helpers import HttpConnection, Scriptlb, get, load_conf, wait_for
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config import ConfigError
from scriptlb.request.access import check_password, md5_crypt, parse_htpasswd


def serve(tmp_path: Path, http: str) -> Scriptlb:
    return Scriptlb(f"daemon off; master_process off; error_log {tmp_path}/error.log info;\n"
                    f"http {{ {http} }}", tmp_path)


# --------------------------------------------------------------------------- config


def test_allow_deny_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf("http {\n server { allow 1.2.3.400; }\n}\n", tmp_path)
    assert str(err.value) == f'[emerg] invalid parameter "1.2.3.400" in {tmp_path}/scriptlb.conf:2'
    conf = load_conf("http { server { location / { allow 10.1.2.3/8; deny all; } } }", tmp_path)
    assert any("low address bits of 10.1.2.3/8 are meaningless" in w for w in conf.warnings)
    assert conf.http is not None
    rules = conf.http.servers[0].locations[0].access
    assert [(r.allow, r.network) for r in rules] == [(True, "10.0.0.0/8"), (False, "all")]


def test_rules_and_auth_inherit_as_nginx(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("")
    conf = load_conf(f"""
        http {{
            deny 10.0.0.1;
            auth_basic "zone";
            server {{
                auth_basic_user_file {tmp_path}/users;
                location /a {{ allow 127.0.0.1; deny all; }}
                location /b {{ auth_basic off; }}
            }}
        }}""", tmp_path)
    assert conf.http is not None
    a, b = conf.http.servers[0].locations
    assert [r.network for r in a.access] == ["127.0.0.1/32", "all"]  # own rules replace
    assert [r.network for r in b.access] == ["10.0.0.1/32"]  # inherited
    assert (a.auth_basic, a.auth_basic_user_file) == ("zone", f"{tmp_path}/users")
    assert (b.auth_basic, b.auth_basic_user_file) == (None, None)


def test_content_handler_directives(tmp_path: Path) -> None:
    conf = load_conf("http { server { location /s { stub_status; } location /api { api write=on; } } }",
                     tmp_path)
    assert conf.http is not None
    s, api = conf.http.servers[0].locations
    assert (s.handler, api.handler, api.api_write) == ("stub_status", "api", True)
    with pytest.raises(ConfigError, match='invalid parameter "write=yes"'):
        load_conf("http { server { location /api { api write=yes; } } }", tmp_path)
    with pytest.raises(ConfigError, match='"stub_status" directive is not allowed here'):
        load_conf("http { stub_status; }", tmp_path)


# --------------------------------------------------------------------------- allow / deny


def test_allow_deny_answers_403_and_logs(tmp_path: Path) -> None:
    http = """server { listen {port0};
        location /open { return 200 "open\\n"; }
        location /ok { allow 127.0.0.0/8; deny all; stub_status; }
        location /no { deny 127.0.0.1; allow all; stub_status; }
        location /ret { deny all; return 200 "rewrite phase first\\n"; }
        location /unix { deny unix:; stub_status; }
    }"""
    with serve(tmp_path, http) as lb:
        assert get(lb.port, "/ok").status == 200
        assert get(lb.port, "/no").status == 403
        assert get(lb.port, "/unix").status == 200  # a TCP client is not unix:
        assert get(lb.port, "/ret").body == b"rewrite phase first\n"  # nginx: return before access
        with HttpConnection(lb.port) as conn:  # the connection survives a 403
            assert conn.request(path="/no").status == 403
            assert conn.request(path="/open").body == b"open\n"
    log = (tmp_path / "error.log").read_text()
    assert re.search(r'\[error\] \d+#0: \*\d+ access forbidden by rule, client: 127\.0\.0\.1, server: , '
                     r'request: "GET /no HTTP/1\.1", host: "localhost"', log), log


# --------------------------------------------------------------------------- auth_basic


def sha_entry(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_htpasswd_formats() -> None:
    # the values of `openssl passwd -apr1 -salt abcdefgh secret` and `openssl passwd -1 -salt xyz pass`
    assert md5_crypt(b"secret", b"abcdefgh") == "$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/"
    assert md5_crypt(b"pass", b"xyz", "$1$") == "$1$xyz$E2BtqrT11oQN8kmxYoxsp1"
    bcrypt_y = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")  # htpasswd -B
    for stored in (bcrypt_y, sha_entry("pw"), md5_crypt(b"pw", b"s4lt"), "{PLAIN}pw"):
        assert check_password("pw", stored), stored
        assert not check_password("pw2", stored), stored
    assert not check_password("pw", "$6$unknown$format")
    assert parse_htpasswd("# c\n\nann:x:comment\nann:y\nbob:z\n") == {"ann": "x", "bob": "z"}


def test_auth_basic_challenge_accept_and_reject(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"b-pw", bcrypt.gensalt(4)).decode()
    users.write_text(f"ann:{md5_crypt(b'a-pw', b'salty')}\nbob:{hashed}\ncid:{sha_entry('c-pw')}\n")
    http = f"""server {{ listen {{port0}};
        location / {{ auth_basic "Restricted area"; auth_basic_user_file {users};
                     return 200 "hello $remote_user\\n"; }}
        location /s {{ auth_basic "Restricted area"; auth_basic_user_file {users}; stub_status; }}
        location /missing {{ auth_basic "x"; auth_basic_user_file {tmp_path}/nope; stub_status; }}
    }}"""
    with serve(tmp_path, http) as lb:
        refused = get(lb.port, "/s")
        assert refused.status == 401
        assert refused.header("WWW-Authenticate") == 'Basic realm="Restricted area"'
        for user in ("ann", "bob", "cid"):
            assert get(lb.port, "/s", headers=auth(user, f"{user[0]}-pw")).status == 200
            assert get(lb.port, "/s", headers=auth(user, "wrong")).status == 401
        assert get(lb.port, "/s", headers=auth("dan", "x")).status == 401
        assert get(lb.port, "/missing", headers=auth("ann", "a-pw")).status == 403
        # `return` runs in the rewrite phase, before auth (nginx's order)
        assert get(lb.port, "/").status == 200
        users.write_text("ann:{PLAIN}new\n")  # the file is read on use
        assert get(lb.port, "/s", headers=auth("ann", "new")).status == 200
    log = (tmp_path / "error.log").read_text()
    assert 'user "ann": password mismatch' in log
    assert f'user "dan" was not found in "{users}"' in log
    assert "no user/password was provided for basic authentication" in log
    assert f'open() "{tmp_path}/nope" failed (2: No such file or directory)' in log


# --------------------------------------------------------------------------- stub_status


def test_stub_status_counts_and_variables(tmp_path: Path) -> None:
    http = """server { listen {port0};
        location = /status { stub_status; }
        location /vars {
            return 200
                "$connections_active $connections_reading $connections_writing $connections_waiting\\n";
        }
    }"""
    with serve(tmp_path, http) as lb, HttpConnection(lb.port) as conn:
        bodies = []
        for _ in range(3):
            bodies.append(conn.request(path="/status").body)
        assert bodies[0] == (b"Active connections: 1 \nserver accepts handled requests\n 1 1 1 \n"
                             b"Reading: 0 Writing: 1 Waiting: 0 \n")
        assert bodies[2].split(b"\n")[2] == b" 1 1 3 "
        assert conn.request(path="/vars").body == b"1 0 1 0\n"
        assert conn.request(method="POST", path="/status", body=b"x").status == 405


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_stub_status_matches_nginx_byte_for_byte(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    block = f"server {{ listen 127.0.0.1:{port}; location = /status {{ stub_status; }} }}"
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()

    def session(port: int) -> list[tuple[int, list[str], bytes]]:
        seen = []
        with HttpConnection(port) as conn:
            for method in ("GET", "GET", "HEAD", "GET"):
                response = conn.request(method=method, path="/status")
                names = sorted(n.lower() for n, _ in response.headers if n.lower() not in ("date", "server"))
                seen.append((response.status, names, response.body))
        return seen

    with nginx_running(ngx_dir, block, [port]):
        theirs = session(port)
    lb_block = block.replace(f"listen 127.0.0.1:{port};", "listen {port0};")
    with serve(lb_dir, lb_block) as lb:
        socket.create_connection(("127.0.0.1", lb.port)).close()  # as nginx_running's readiness probe
        wait_for(lambda: not lb.thread.worker.contexts[0].connections, what="the probe's close")
        ours = session(lb.port)
    assert ours == theirs
    assert theirs[1][2].split(b"\n")[2] == b" 2 2 2 "

"""Issue 5's directives: python_shared_dict and the log phase hooks (log_by_python_*).

Loaded through the public ``load()`` from a temporary prefix, as test_config_directives does;
error texts are compared whole, with the prefix shortened away.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scriptlb.config import ConfigError, load
from scriptlb.config.directives import MIN_SHARED_DICT_SIZE
from scriptlb.config.model import HookConf, HttpConf, LocationConf, SharedDictConf, Source
from scriptlb.state.shared_dict import MIN_SIZE, SharedDict


def load_http(tmp_path: Path, body: str) -> HttpConf:
    (tmp_path / "x.conf").write_text(f"events {{}}\nhttp {{\n{body}\n}}\n")
    conf = load("x.conf", str(tmp_path))
    assert conf.http is not None
    return conf.http


def http_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_http(tmp_path, body)
    return str(info.value).replace(f"{tmp_path}/", "")


def locations(http: HttpConf) -> dict[str, LocationConf]:
    return {loc.pattern: loc for server in http.servers for loc in server.locations}


# --------------------------------------------------------------------------- python_shared_dict


def test_shared_dicts_keep_name_size_and_source(tmp_path: Path) -> None:
    http = load_http(tmp_path, "python_shared_dict counters 1m;\npython_shared_dict Sessions 65536;")
    x = str(tmp_path / "x.conf")
    assert http.shared_dicts == {
        "counters": SharedDictConf("counters", 1024 * 1024, Source(x, 3)),
        "Sessions": SharedDictConf("Sessions", 65536, Source(x, 4)),
    }
    assert list(http.shared_dicts) == ["counters", "Sessions"]  # file order


def test_no_shared_dicts_by_default(tmp_path: Path) -> None:
    assert load_http(tmp_path, "").shared_dicts == {}


def test_the_size_floor_is_what_shared_dict_accepts(tmp_path: Path) -> None:
    assert MIN_SHARED_DICT_SIZE == MIN_SIZE
    conf = load_http(tmp_path, "python_shared_dict a 64k;").shared_dicts["a"]
    assert conf.size == MIN_SIZE
    opened = SharedDict(str(tmp_path / "dicts"), conf.name, conf.size)  # the smallest one opens
    assert opened.capacity() == MIN_SIZE
    opened.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('python_shared_dict "" 1m;', 'invalid python shared dict name ""'),
        ("python_shared_dict a 65535;", 'invalid python shared dict size "65535"'),
        ("python_shared_dict a 63k;", 'invalid python shared dict size "63k"'),
        ("python_shared_dict a 1g;", 'invalid python shared dict size "1g"'),  # sizes know k/m only
        ("python_shared_dict a lots;", 'invalid python shared dict size "lots"'),
        ("python_shared_dict a;", 'invalid number of arguments in "python_shared_dict" directive'),
        ("python_shared_dict a 1m 2m;", 'invalid number of arguments in "python_shared_dict" directive'),
        (
            "python_shared_dict a 1m;\npython_shared_dict a 1m;",
            'python_shared_dict "a" is already defined as "a"',
        ),
        (
            "python_shared_dict a 1m;\npython_shared_dict a 2m;",
            'the size 2097152 of shared memory zone "a" conflicts with already declared size 1048576',
        ),
        ("server { python_shared_dict a 1m; }", '"python_shared_dict" directive is not allowed here'),
        ("upstream u { python_shared_dict a 1m; }", '"python_shared_dict" directive is not allowed here'),
    ],
)
def test_shared_dict_errors(tmp_path: Path, body: str, message: str) -> None:
    line = 3 + body.count("\n")  # the body starts on line 3
    assert http_error(tmp_path, body) == f"[emerg] {message} in x.conf:{line}"


def test_shared_dict_names_are_case_sensitive(tmp_path: Path) -> None:
    http = load_http(tmp_path, "python_shared_dict a 1m;\npython_shared_dict A 2m;")
    assert sorted(http.shared_dicts) == ["A", "a"]


def test_shared_dict_outside_http_is_not_allowed(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text("python_shared_dict a 1m;\n")
    with pytest.raises(ConfigError) as info:
        load("x.conf", str(tmp_path))
    message = '[emerg] "python_shared_dict" directive is not allowed here'
    assert str(info.value) == f"{message} in {tmp_path}/x.conf:1"


# --------------------------------------------------------------------------- log_by_python


def test_log_hook_file_at_each_level_and_the_innermost_wins(tmp_path: Path) -> None:
    for name in ("h.py", "s.py", "l.py"):
        (tmp_path / name).write_text("pass\n")
    http = load_http(
        tmp_path,
        "log_by_python_file h.py;\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /plain { return 200; }\n"
        "  location /own { log_by_python_file l.py; }\n"
        "}\n"
        "server { listen 127.0.0.1:8081; log_by_python_file s.py;\n"
        "  location /srv { return 200; }\n"
        "}\n",
    )
    locs = locations(http)
    x = str(tmp_path / "x.conf")
    inherited = locs["/plain"].log_hook
    assert inherited == HookConf("file", str(tmp_path / "h.py"), None, Source(x, 3), 0.010, 0, "log")
    assert inherited.chunk_name == str(tmp_path / "h.py")
    assert locs["/own"].log_hook is not None and locs["/own"].log_hook.path == str(tmp_path / "l.py")
    assert locs["/srv"].log_hook is not None and locs["/srv"].log_hook.path == str(tmp_path / "s.py")


def test_no_log_hook_by_default(tmp_path: Path) -> None:
    http = load_http(tmp_path, "server { listen 127.0.0.1:8080; location / { return 200; } }")
    assert locations(http)["/"].log_hook is None


def test_log_hook_block_keeps_code_lines_and_names_its_chunk(tmp_path: Path) -> None:
    http = load_http(
        tmp_path,
        "server { listen 127.0.0.1:8080;\n"
        "  location / {\n"
        "    log_by_python_block {\n"
        "        if ngx.var.status == '502':\n"
        "            ngx.shared.errors.incr('502', 1, 0)\n"
        "    }\n"
        "  }\n"
        "}\n",
    )
    hook = locations(http)["/"].log_hook
    assert hook is not None
    assert (hook.kind, hook.phase, hook.path) == ("block", "log", None)
    assert hook.code == "if ngx.var.status == '502':\n    ngx.shared.errors.incr('502', 1, 0)\n"
    assert (hook.source.line, hook.first_line) == (5, 6)
    assert hook.chunk_name == f"log_by_python({tmp_path}/x.conf:5)"


def test_balancer_hooks_keep_their_phase_and_chunk_name(tmp_path: Path) -> None:
    http = load_http(tmp_path, "upstream u { server 127.0.0.1:1; balancer_by_python_block { pass } }")
    hook = http.upstreams["u"].hook
    assert hook is not None and hook.phase == "balancer"
    assert hook.chunk_name == f"balancer_by_python({tmp_path}/x.conf:3)"


def test_log_hook_timeout_is_inherited_on_its_own(tmp_path: Path) -> None:
    http = load_http(
        tmp_path,
        "log_by_python_timeout 50ms; log_by_python_block { pass }\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /a { return 200; }\n"
        "  location /b { log_by_python_timeout 1s; }\n"
        "}\n",
    )
    locs = locations(http)
    assert locs["/a"].log_hook is not None and locs["/a"].log_hook.timeout == 0.05
    assert locs["/b"].log_hook is not None and locs["/b"].log_hook.timeout == 1.0
    assert locs["/b"].log_hook.source == locs["/a"].log_hook.source  # the same http-level code


def test_http_hooks_lists_every_hook_once(tmp_path: Path) -> None:
    http = load_http(
        tmp_path,
        "log_by_python_block { pass }\n"
        "upstream u { server 127.0.0.1:1; balancer_by_python_block { pass } }\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /a { proxy_pass http://u; }\n"
        "  location /b { return 200; }\n"
        "  location /c { log_by_python_block { pass } }\n"
        "}\n",
    )
    hooks = http.hooks()
    assert [(h.phase, h.source.line) for h in hooks] == [("balancer", 4), ("log", 3), ("log", 8)]


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        (
            "log_by_python_block { pass }\nlog_by_python_file h.py;",
            4,
            '"log_by_python_file" directive is duplicate',
        ),
        (
            "server { log_by_python_file h.py; log_by_python_block { pass } }",
            3,
            '"log_by_python_block" directive is duplicate',
        ),
        (
            "server { location / {\nlog_by_python_block { pass }\nlog_by_python_block { pass } } }",
            5,
            '"log_by_python_block" directive is duplicate',
        ),
        ("log_by_python_file nofile.py;", 3, 'open() "nofile.py" failed (2: No such file or directory)'),
        ("log_by_python_file;", 3, 'invalid number of arguments in "log_by_python_file" directive'),
        ("log_by_python_block;", 3, 'directive "log_by_python_block" has no opening "{"'),
        (
            "log_by_python_block x { pass }",
            3,
            'invalid number of arguments in "log_by_python_block" directive',
        ),
        ("log_by_python_file h.py { }", 3, 'directive "log_by_python_file" is not terminated by ";"'),
        ("log_by_python_timeout 0;", 3, '"log_by_python_timeout" directive invalid value'),
        (
            "log_by_python_timeout 1ms; log_by_python_timeout 2ms;",
            3,
            '"log_by_python_timeout" directive is duplicate',
        ),
        (
            "upstream u { server 127.0.0.1:1; log_by_python_block { pass } }",
            3,
            '"log_by_python_block" directive is not allowed here',
        ),
    ],
)
def test_log_hook_errors(tmp_path: Path, body: str, line: int, message: str) -> None:
    (tmp_path / "h.py").write_text("pass\n")
    assert http_error(tmp_path, body) == f"[emerg] {message} in x.conf:{line}"


def test_log_hook_in_main_is_not_allowed(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text("\nlog_by_python_block { pass }\n")
    with pytest.raises(ConfigError) as info:
        load("x.conf", str(tmp_path))
    message = '[emerg] "log_by_python_block" directive is not allowed here'
    assert str(info.value) == f"{message} in {tmp_path}/x.conf:2"


# --------------------------------------------------------------------------- balancer_keepalive

_HOOKED = "upstream u {{ server 127.0.0.1:1; {extra} balancer_by_python_block {{ pass }} }}"


def test_balancer_keepalive_sizes_the_hook_peer_pool(tmp_path: Path) -> None:
    default = load_http(tmp_path, _HOOKED.format(extra="")).upstreams["u"]
    sized = load_http(tmp_path, _HOOKED.format(extra="balancer_keepalive 128;")).upstreams["u"]
    assert (default.balancer_keepalive, sized.balancer_keepalive) == (32, 128)  # OpenResty's default


@pytest.mark.parametrize(("extra", "message"), [
    ("balancer_keepalive 0;", 'invalid value "0" in "balancer_keepalive" directive'),
    ("balancer_keepalive many;", 'invalid value "many" in "balancer_keepalive" directive'),
    ("balancer_keepalive 8; balancer_keepalive 9;", '"balancer_keepalive" directive is duplicate'),
])
def test_balancer_keepalive_errors(tmp_path: Path, extra: str, message: str) -> None:
    assert http_error(tmp_path, _HOOKED.format(extra=extra)) == f"[emerg] {message} in x.conf:3"


# --------------------------------------------------------------------------- python_memory_limit


@pytest.mark.parametrize(("directive", "limit"), [
    ("", 1 << 30),  # default: 1 GiB of address space beyond the shared dict maps
    ("python_memory_limit 512m;", 512 << 20),
    ("python_memory_limit off;", 0),
])
def test_python_memory_limit(tmp_path: Path, directive: str, limit: int) -> None:
    assert load_http(tmp_path, directive).python.memory_limit == limit


def test_python_memory_limit_rejects_garbage(tmp_path: Path) -> None:
    message = http_error(tmp_path, "python_memory_limit lots;")
    assert message == '[emerg] "python_memory_limit" directive invalid value in x.conf:3'


def test_the_worker_memory_limit_adds_the_shared_dict_maps(tmp_path: Path) -> None:
    from scriptlb.process.worker import worker_memory_limit
    from scriptlb.state.shared_dict import map_size

    http = load_http(tmp_path, "python_memory_limit 256m; python_shared_dict a 1m;")
    assert worker_memory_limit(http) == (256 << 20) + map_size(1 << 20)
    assert worker_memory_limit(load_http(tmp_path, "python_memory_limit off;")) == 0


# --------------------------------------------------------------------------- python_peer_stats


@pytest.mark.parametrize(("directive", "on"), [
    ("", True),  # default: every upstream's peers have live statistics
    ("python_peer_stats on;", True),
    ("python_peer_stats off;", False),
])
def test_python_peer_stats(tmp_path: Path, directive: str, on: bool) -> None:
    assert load_http(tmp_path, directive).python.peer_stats is on


@pytest.mark.parametrize(("body", "message"), [
    ("python_peer_stats maybe;",
     '[emerg] invalid value "maybe" in "python_peer_stats" directive, it must be "on" or "off" in x.conf:3'),
    ("python_peer_stats on;\npython_peer_stats off;",
     '[emerg] "python_peer_stats" directive is duplicate in x.conf:4'),
    ("server { python_peer_stats off; }",
     '[emerg] "python_peer_stats" directive is not allowed here in x.conf:3'),
])
def test_python_peer_stats_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, body) == message

"""Targets of the benchmark and the config files they run with (pure text generation).

Backends: one nginx, 1 worker, four ports, each answering ``/`` with a small body
(``return 200``) and ``/big`` with a 64 KiB static file; every answer carries ``X-Backend: PORT``
so the harness can check which backend a proxy chose.

Proxies: each with 1 worker (except ``scriptlb-2w``), upstream keep-alive on, access logs off,
over the same four backends. The two hook targets pick the peer by ``crc32(uri) % 4``, the same
code in Lua and in Python.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

BIG_SIZE = 64 * 1024
SMALL_BODY = "hello from the backend\n"
UPSTREAM_KEEPALIVE = 128  # >= wrk connections, so no target has to churn upstream connections
# client-side keep-alive: let wrk's connections live through a whole run on every target
CLIENT_KEEPALIVE_REQUESTS = 1_000_000
MAX_CONNS = 16_384  # room for the idle-connection measurement (10,000 clients)

NGINX_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
LUA_PATHS = ("/usr/share/lua/5.1", "/usr/local/share/lua/5.1", "/usr/local/openresty/lualib")


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    kind: str  # nginx | haproxy | scriptlb
    hook: bool = False
    workers: int = 1
    peer_stats: bool = True  # scriptlb: python_peer_stats (the A/B for what statistics cost)
    # scriptlb hooks: "inline" (the code in the block, plus enable_keepalive), "ported" (as an
    # OpenResty user ports it: `keepalive N` pools the hook's peers, no enable_keepalive), or
    # "module" (ported, and the picking function imported from a module on python_package_path)
    hook_style: str = "inline"


TARGETS: tuple[Target, ...] = (
    Target("nginx", "nginx proxy_pass (round robin)", "nginx"),
    Target("nginx-lua", "nginx + balancer_by_lua_block (crc32 of URI)", "nginx", hook=True),
    Target("haproxy", "HAProxy roundrobin + http-reuse", "haproxy"),
    Target("scriptlb", "scriptlb round robin", "scriptlb"),
    Target("scriptlb-hook", "scriptlb + balancer_by_python_block (crc32 of URI)", "scriptlb", hook=True),
    Target("scriptlb-2w", "scriptlb round robin, 2 workers", "scriptlb", workers=2),
    Target("scriptlb-nostats", "scriptlb round robin, python_peer_stats off", "scriptlb", peer_stats=False),
    # optional: the hook as an OpenResty user ports it (`keepalive 128` pools its peers, no
    # enable_keepalive), the picking function imported from a module on python_package_path,
    # and the same written inline (its A/B partner)
    Target("scriptlb-hook-module", "scriptlb + hook importing its picker from python_package_path "
           "(keepalive 128, no enable_keepalive)", "scriptlb", hook=True, hook_style="module"),
    Target("scriptlb-hook-ported", "scriptlb + hook as ported from OpenResty (keepalive 128, inline)",
           "scriptlb", hook=True, hook_style="ported"),
    # optional reference, not in the default set: bench/floor_proxy.py, a minimal uvloop+httptools
    # proxy showing what the same event loop and parser reach here
    Target("py-floor", "minimal uvloop+httptools proxy (reference floor, not scriptlb)", "floor"),
    # the same floor doing the least any proxy must: forward the client's headers, time the
    # backend's answer out (bench/floor_proxy.py --forward-headers)
    Target("py-floor-headers", "the py-floor forwarding the client's headers, with a read timeout "
           "(reference, not scriptlb)", "floor"),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)
# optional targets (named with --targets): the py-floor references and the two ported-hook styles
OPTIONAL_TARGETS = ("py-floor", "py-floor-headers", "scriptlb-hook-module", "scriptlb-hook-ported")
DEFAULT_TARGETS = tuple(t.name for t in TARGETS if t.name not in OPTIONAL_TARGETS)
# the high-concurrency run (--overload-connections): scriptlb beside nginx and HAProxy
OVERLOAD_TARGETS = ("scriptlb", "nginx", "haproxy")  # scriptlb first: a short budget keeps it


def target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise KeyError(f"unknown target {name!r} (known: {', '.join(TARGET_NAMES)})")


def hook_backend_index(uri: str, n: int = 4) -> int:
    """The backend (0-based) both hooks choose for ``uri``: ngx.crc32_long is zlib's crc32."""
    return zlib.crc32(uri.encode()) % n


# --------------------------------------------------------------------------- nginx


def _nginx_main(prefix: str, workers: int = 1) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
        f"worker_rlimit_nofile {MAX_CONNS * 2 + 100};\n"
        f"pid {prefix}/logs/nginx.pid;\nerror_log {prefix}/logs/error.log error;\n"
    )


def _nginx_http_common(prefix: str) -> str:
    temps = "".join(
        f"    {k}_temp_path {prefix}/tmp/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "    access_log off;\n"
        f"    keepalive_requests {CLIENT_KEEPALIVE_REQUESTS};\n"
        "    keepalive_timeout 75s;\n"
        + temps
    )


def backends_nginx_conf(prefix: str, ports: list[int], status_port: int | None = None) -> str:
    """The backends; ``status_port`` adds nginx's stub_status there (its ``accepts`` counter
    tells how many upstream connections a proxy opened during a run)."""
    servers = "".join(
        f"    server {{\n"
        f"        listen 127.0.0.1:{p} backlog=4096;\n"
        f"        add_header X-Backend {p} always;\n"
        f"        location = /big {{ alias {prefix}/html/big.bin; }}\n"
        f'        location / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}\n'
        f"    }}\n"
        for p in ports
    )
    if status_port:
        servers += (f"    server {{\n        listen 127.0.0.1:{status_port};\n"
                    f"        location = /status {{ stub_status; }}\n    }}\n")
    return (
        _nginx_main(prefix)
        + f"events {{ worker_connections {MAX_CONNS}; }}\n"
        + "http {\n"
        + _nginx_http_common(prefix)
        + "    default_type text/plain;\n    sendfile on;\n"
        + servers
        + "}\n"
    )


def lua_hook(ports: list[int]) -> str:
    plist = ", ".join(str(p) for p in ports)
    return (
        'local balancer = require "ngx.balancer"\n'
        f"local ports = {{{plist}}}\n"
        f"local i = ngx.crc32_long(ngx.var.uri) % {len(ports)} + 1\n"
        'local ok, err = balancer.set_current_peer("127.0.0.1", ports[i])\n'
        'if not ok then ngx.log(ngx.ERR, "set_current_peer: ", err) end\n'
    )


def python_hook(ports: list[int], keepalive: bool = True) -> str:
    """The Python twin of ``lua_hook``. With ``keepalive`` it also calls
    ``balancer.enable_keepalive(60, 0)``: scriptlb follows OpenResty >= 0.10.27, where a
    hook-set peer's connection is pooled only after that call (0 = no request limit), while
    Debian's ngx_lua 0.10.23 has no such call and gets keep-alive from nginx's ``keepalive``
    wrapping the Lua balancer (it follows the Lua block in the upstream)."""
    plist = ", ".join(str(p) for p in ports)
    text = (
        f"PORTS = ({plist})\n"
        f"i = ngx.crc32_long(ngx.var.uri) % {len(ports)}\n"
        'ok, err = balancer.set_current_peer("127.0.0.1", PORTS[i])\n'
    )
    if keepalive:
        return text + (
            "if ok:\n"
            "    balancer.enable_keepalive(60, 0)\n"
            "else:\n"
            '    ngx.log(ngx.ERR, "set_current_peer: ", err)\n'
        )
    return text + 'if not ok:\n    ngx.log(ngx.ERR, "set_current_peer: ", err)\n'


PICKER_MODULE = "picker"


def picker_module(ports: list[int]) -> str:
    """The module the "module" hook imports (from python_package_path): the same crc32 choice."""
    plist = ", ".join(str(p) for p in ports)
    return (
        "import zlib\n\n"
        f"PORTS = ({plist})\n\n\n"
        "def pick(uri):\n"
        "    return PORTS[zlib.crc32(uri.encode()) % len(PORTS)]\n"
    )


def python_module_hook() -> str:
    return (
        f"import {PICKER_MODULE}\n"
        f'ok, err = balancer.set_current_peer("127.0.0.1", {PICKER_MODULE}.pick(ngx.var.uri))\n'
        'if not ok:\n    ngx.log(ngx.ERR, "set_current_peer: ", err)\n'
    )


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "".join(pad + line + "\n" if line else "\n" for line in text.splitlines())


def find_lua_module_dir() -> str | None:
    for d in NGINX_MODULE_DIRS:
        if all(os.path.exists(os.path.join(d, m)) for m in LUA_MODULES):
            return d
    return None


def find_lua_resty_core() -> str | None:
    for d in LUA_PATHS:
        if os.path.exists(os.path.join(d, "resty", "core.lua")) and os.path.exists(
            os.path.join(d, "ngx", "balancer.lua")
        ):
            return d
    return None


def nginx_proxy_conf(prefix: str, listen: int, ports: list[int], hook: bool,
                     module_dir: str | None = None, lua_dir: str | None = None) -> str:
    """nginx as the proxy: round robin, or the Lua hook (which needs the module .so lines)."""
    head = ""
    http_extra = ""
    up_extra = ""
    if hook:
        module_dir = module_dir or find_lua_module_dir() or NGINX_MODULE_DIRS[0]
        lua_dir = lua_dir or find_lua_resty_core() or LUA_PATHS[0]
        # explicit load_module lines: the harness must not depend on /etc/nginx/modules-enabled
        head = "".join(f"load_module {module_dir}/{m};\n" for m in LUA_MODULES)
        http_extra = f'    lua_package_path "{lua_dir}/?.lua;;";\n'
        up_extra = "        balancer_by_lua_block {\n" + _indent(lua_hook(ports), 12) + "        }\n"
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in ports)
    return (
        head
        + _nginx_main(prefix)
        + f"events {{ worker_connections {MAX_CONNS}; }}\n"
        + "http {\n"
        + _nginx_http_common(prefix)
        + http_extra
        + "    upstream backend {\n"
        + servers
        + up_extra
        + f"        keepalive {UPSTREAM_KEEPALIVE};\n"
        + f"        keepalive_requests {CLIENT_KEEPALIVE_REQUESTS};\n"
        + "    }\n"
        + "    server {\n"
        + f"        listen 127.0.0.1:{listen} backlog=4096;\n"
        + "        location / {\n"
        + "            proxy_pass http://backend;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "        }\n"
        + "    }\n"
        + "}\n"
    )


# --------------------------------------------------------------------------- HAProxy


def haproxy_maxconn(fd_limit: int | None) -> int:
    """HAProxy reserves two descriptors per connection and refuses to start when the hard
    RLIMIT_NOFILE cannot hold them, so its maxconn follows the limit it will run with."""
    if fd_limit is None:
        return MAX_CONNS
    return max(256, min(MAX_CONNS, (fd_limit - 200) // 2))


def haproxy_conf(prefix: str, listen: int, ports: list[int], maxconn: int = MAX_CONNS) -> str:
    servers = "".join(f"    server b{i} 127.0.0.1:{p}\n" for i, p in enumerate(ports))
    return (
        "global\n"
        "    nbthread 1\n"
        f"    maxconn {maxconn}\n"
        f"    pidfile {prefix}/logs/haproxy.pid\n"
        "defaults\n"
        "    mode http\n"
        "    option http-keep-alive\n"
        "    timeout connect 5s\n"
        "    timeout client 75s\n"
        "    timeout server 60s\n"
        "    timeout http-keep-alive 75s\n"
        f"    maxconn {maxconn}\n"
        "frontend fe\n"
        f"    bind 127.0.0.1:{listen}\n"
        "    default_backend be\n"
        "backend be\n"
        "    balance roundrobin\n"
        "    http-reuse always\n"
        + servers
    )


# --------------------------------------------------------------------------- scriptlb


def scriptlb_conf(prefix: str, listen: int, ports: list[int], hook: bool, workers: int = 1,
                  master: bool = True, balancer_keepalive: int | None = UPSTREAM_KEEPALIVE,
                  peer_stats: bool = True, hook_style: str = "inline") -> str:
    """scriptlb's config; with ``hook``, ``balancer_keepalive`` sizes the pool of hook-set peers'
    connections (OpenResty's directive, default 32; None leaves the directive out) for the
    "inline" style; the "ported" and "module" styles rely on ``keepalive N`` alone."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in ports)
    hook_text = ""
    package_path = ""
    if hook and hook_style == "inline":
        hook_text = "        balancer_by_python_block {\n" + _indent(python_hook(ports), 12) + "        }\n"
        if balancer_keepalive:
            hook_text += f"        balancer_keepalive {balancer_keepalive};\n"
    elif hook:
        code = python_module_hook() if hook_style == "module" else python_hook(ports, keepalive=False)
        hook_text = "        balancer_by_python_block {\n" + _indent(code, 12) + "        }\n"
        if hook_style == "module":
            package_path = f'    python_package_path "{prefix}/lib/?.py";\n'
    return (
        "daemon off;\n"
        f"master_process {'on' if master else 'off'};\n"
        f"worker_processes {workers};\n"
        f"pid {prefix}/logs/scriptlb.pid;\n"
        f"error_log {prefix}/logs/error.log error;\n"
        f"events {{ worker_connections {MAX_CONNS}; }}\n"
        "http {\n"
        "    access_log off;\n"
        + package_path
        + ("" if peer_stats else "    python_peer_stats off;\n")
        + f"    keepalive_requests {CLIENT_KEEPALIVE_REQUESTS};\n"
        "    keepalive_timeout 75s;\n"
        "    upstream backend {\n"
        + servers
        + hook_text
        + f"        keepalive {UPSTREAM_KEEPALIVE};\n"
        + f"        keepalive_requests {CLIENT_KEEPALIVE_REQUESTS};\n"
        + "    }\n"
        + "    server {\n"
        + f"        listen 127.0.0.1:{listen};\n"
        + "        location / {\n"
        + "            proxy_pass http://backend;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "        }\n"
        + "    }\n"
        + "}\n"
    )


def config_for(t: Target, prefix: str, listen: int, ports: list[int],
               fd_limit: int | None = None, balancer_keepalive: int | None = UPSTREAM_KEEPALIVE
               ) -> tuple[str, str]:
    """(file name, text) of ``t``'s config, to be written under ``prefix/conf/``."""
    if t.kind == "nginx":
        return "nginx.conf", nginx_proxy_conf(prefix, listen, ports, t.hook)
    if t.kind == "haproxy":
        return "haproxy.cfg", haproxy_conf(prefix, listen, ports, haproxy_maxconn(fd_limit))
    if t.kind == "floor":
        return "floor.args", f"{listen} {','.join(str(p) for p in ports)}\n"
    if t.kind == "scriptlb":
        return "scriptlb.conf", scriptlb_conf(prefix, listen, ports, t.hook, t.workers,
                                              balancer_keepalive=balancer_keepalive,
                                              peer_stats=t.peer_stats, hook_style=t.hook_style)
    raise ValueError(t.kind)


def make_prefix(prefix: str) -> None:
    for sub in ("conf", "logs", "html", "tmp"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)


def write_backends(prefix: str, ports: list[int], status_port: int | None = None) -> str:
    """Write the backends' prefix (config + 64 KiB file); returns the config path."""
    make_prefix(prefix)
    big = os.path.join(prefix, "html", "big.bin")
    if not os.path.exists(big) or os.path.getsize(big) != BIG_SIZE:
        with open(big, "wb") as f:
            f.write((b"0123456789abcdef" * (BIG_SIZE // 16))[:BIG_SIZE])
    path = os.path.join(prefix, "conf", "nginx.conf")
    with open(path, "w") as f:
        f.write(backends_nginx_conf(prefix, ports, status_port))
    return path


def write_target(t: Target, prefix: str, listen: int, ports: list[int], fd_limit: int | None = None,
                 balancer_keepalive: int | None = UPSTREAM_KEEPALIVE) -> str:
    make_prefix(prefix)
    if t.kind == "scriptlb" and t.hook and t.hook_style == "module":
        os.makedirs(os.path.join(prefix, "lib"), exist_ok=True)
        with open(os.path.join(prefix, "lib", f"{PICKER_MODULE}.py"), "w") as f:
            f.write(picker_module(ports))
    name, text = config_for(t, prefix, listen, ports, fd_limit, balancer_keepalive)
    path = os.path.join(prefix, "conf", name)
    with open(path, "w") as f:
        f.write(text)
    return path

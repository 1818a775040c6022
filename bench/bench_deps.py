"""What the benchmark needs, installing it when it can (apt as root, pip into this interpreter).

``check()`` returns a ``Deps`` that says, for each program, where it is or exactly what is
missing; ``ensure()`` first installs what is missing (one ``apt-get update`` + one
``apt-get install``, one ``pip install``) unless told not to, then checks again.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import bench_conf

APT_PACKAGES = {
    "nginx": "nginx",
    "lua": "libnginx-mod-http-lua lua-resty-core",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "taskset": "util-linux",
}


@dataclass
class Deps:
    nginx: str | None = None
    lua_modules: str | None = None  # directory holding ndk_http_module.so + ngx_http_lua_module.so
    lua_resty_core: str | None = None  # lua_package_path root holding resty/core.lua
    haproxy: str | None = None
    wrk: str | None = None
    taskset: str | None = None
    matplotlib: bool = False
    notes: list[str] = field(default_factory=list)

    def missing(self, what: str) -> str | None:
        """None when ``what`` is usable, else 'missing: ...' text naming the package."""
        if what == "nginx" and not self.nginx:
            return "missing: nginx (Debian package nginx)"
        if what == "lua":
            gaps = []
            if not self.nginx:
                gaps.append("nginx")
            if not self.lua_modules:
                gaps.append("ngx_http_lua_module.so (Debian package libnginx-mod-http-lua)")
            if not self.lua_resty_core:
                gaps.append("resty/core.lua (Debian package lua-resty-core)")
            return "missing: " + ", ".join(gaps) if gaps else None
        if what == "haproxy" and not self.haproxy:
            return "missing: haproxy (Debian package haproxy)"
        if what == "wrk" and not self.wrk:
            return "missing: wrk (Debian package wrk)"
        if what == "matplotlib" and not self.matplotlib:
            return "missing: matplotlib (pip install matplotlib, or .venv/bin/pip install -e '.[bench]')"
        return None


def _which(name: str, *extra: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in extra:
        if os.access(path, os.X_OK):
            return path
    return None


def check() -> Deps:
    return Deps(
        nginx=_which("nginx", "/usr/sbin/nginx"),
        lua_modules=bench_conf.find_lua_module_dir(),
        lua_resty_core=bench_conf.find_lua_resty_core(),
        haproxy=_which("haproxy", "/usr/sbin/haproxy"),
        wrk=_which("wrk"),
        taskset=_which("taskset"),
        matplotlib=importlib.util.find_spec("matplotlib") is not None,
    )


def _apt_install(pkgs: list[str], log: list[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log.append(f"not root or no apt-get: cannot install {' '.join(pkgs)}")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *pkgs]):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, check=False)
        except subprocess.TimeoutExpired:
            log.append(f"{' '.join(argv[:2])}: timed out")
            return
        if p.returncode != 0:
            log.append(f"{' '.join(argv[:2])} failed: {(p.stderr or p.stdout).strip()[-300:]}")
            return
    log.append(f"installed with apt-get: {' '.join(pkgs)}")


def _pip_install(pkgs: list[str], log: list[str]) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--quiet", *pkgs]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        log.append("pip install timed out")
        return
    if p.returncode != 0:
        log.append(f"pip install {' '.join(pkgs)} failed: {(p.stderr or p.stdout).strip()[-300:]}")
    else:
        log.append(f"installed with pip: {' '.join(pkgs)}")
        importlib.invalidate_caches()


def ensure(install: bool = True, want_pyspy: bool = False) -> Deps:
    deps = check()
    log: list[str] = []
    if install:
        apt = []
        if not deps.nginx:
            apt.append(APT_PACKAGES["nginx"])
        if not deps.lua_modules or not deps.lua_resty_core:
            apt.append(APT_PACKAGES["lua"])
        if not deps.haproxy:
            apt.append(APT_PACKAGES["haproxy"])
        if not deps.wrk:
            apt.append(APT_PACKAGES["wrk"])
        if not deps.taskset:
            apt.append(APT_PACKAGES["taskset"])
        if apt:
            _apt_install(" ".join(apt).split(), log)
        pip = []
        if not deps.matplotlib:
            pip.append("matplotlib")
        if want_pyspy and not pyspy():
            pip.append("py-spy")
        if pip:
            _pip_install(pip, log)
        deps = check()
    deps.notes = log
    return deps


def pyspy() -> str | None:
    """py-spy next to this interpreter (a venv's bin/) or on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return local if os.access(local, os.X_OK) else shutil.which("py-spy")

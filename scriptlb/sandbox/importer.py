"""``import`` inside hooks: the allow-listed standard stand-ins, ``ngx``, and sandboxed modules
found on ``python_package_path``.

A package module is compiled under the same policy as hooks and executed once per worker (the
first import, inside the importing run's budget); its globals then live as long as the worker,
so it can keep worker-level state such as caches. With ``python_code_cache off`` the runner
calls ``forget()`` before each run, so modules are re-read like hook files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import CodeType
from typing import Any

from scriptlb.sandbox import limits
from scriptlb.sandbox.guards import expose_dynamic
from scriptlb.sandbox.modules import PARENTS, standard_module
from scriptlb.sandbox.policy import HookCompileError, compile_hook

OWNER_KEY = "__modules__"  # per hook/module cache of stateful stand-ins (random); not spellable


class PackageModule:
    """A sandboxed module as its importers see it: its public globals, read-only."""

    __slots__ = ("_globals", "_name")

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_globals", namespace)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._globals:
            raise AttributeError(f"module '{self._name}' has no attribute '{name}'")
        return self._globals[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"module '{self._name}' is read-only in hooks")

    def __repr__(self) -> str:
        return f"<module '{self._name}' (sandboxed)>"


expose_dynamic(PackageModule, getattr)


class Importer:
    """The ``__import__`` of hook code. One per process; ``configure()`` sets the search path."""

    def __init__(self) -> None:
        self.package_path: tuple[str, ...] = ()
        self._modules: dict[str, PackageModule] = {}
        self._loading: set[str] = set()
        self._special: dict[str, Any] = {}
        self._code: dict[tuple[str, str], CodeType] = {}  # (path, source) -> code
        self._module_globals: Callable[[str], dict[str, Any]] = dict  # set by the runner module

    def configure(self, package_path: tuple[str, ...], module_globals: Callable[[str], dict[str, Any]],
                  special: dict[str, Any]) -> None:
        if package_path != self.package_path:
            self._modules.clear()
        self.package_path = package_path
        self._module_globals = module_globals
        self._special = special

    def forget(self) -> None:
        """Drop loaded package modules (python_code_cache off)."""
        self._modules.clear()

    def __call__(self, name: str, globals: dict[str, Any] | None = None, locals: Any = None,
                 fromlist: Any = (), level: int = 0) -> Any:
        if level:
            raise ImportError("relative imports are not allowed in hooks")
        top = name.partition(".")[0]
        special = self._special.get(top)
        if special is not None:  # ngx, ngx.balancer, ngx.upstream: attributes of the namespace
            return special
        if fromlist and name in PARENTS:  # `from scriptlb import balancers`; other names fail
            return PARENTS[name]
        owner = globals.get(OWNER_KEY) if globals is not None else None
        module = standard_module(name, owner if owner is not None else {})
        if module is not None:
            # `import a.b` (no fromlist) returns `a`, as Python's __import__ does
            return PARENTS[top] if top != name and not fromlist else module
        return self._package_module(name)

    def _package_module(self, name: str) -> PackageModule:
        module = self._modules.get(name)
        if module is not None:
            return module
        if name in self._loading:
            raise ImportError(f"circular import of module '{name}'")
        path = self._find(name)
        if path is None:
            raise ModuleNotFoundError(f"No module named '{name}' (not allowed, not on python_package_path)")
        self._loading.add(name)
        try:
            module = self._load(name, path)
        finally:
            self._loading.discard(name)
        self._modules[name] = module
        return module

    def _compile(self, path: str) -> CodeType | str:
        """The module's code (cached by source text), or the error text with file:line."""
        with open(path, encoding="utf-8") as f:
            source = f.read()
        code = self._code.get((path, source))
        if code is None:
            try:
                code = compile_hook(source, path)
            except HookCompileError as err:
                return f"{err.message} in {path}:{err.lineno}"
            if len(self._code) > 256:
                self._code.clear()
            self._code[(path, source)] = code
        return code

    def _find(self, name: str) -> str | None:
        if not all(part.isidentifier() for part in name.split(".")):
            return None
        relative = name.replace(".", os.sep)
        for pattern in self.package_path:
            candidate = pattern.replace("?", relative)
            if os.path.isfile(candidate):
                return candidate
        return None

    def _load(self, name: str, path: str) -> PackageModule:
        started = limits.clock()
        try:
            code = self._compile(path)
        finally:
            # reading and compiling is the host's work: it does not count against the run
            limits.BUDGET.deadline += limits.clock() - started
        if isinstance(code, str):
            raise ImportError(f"cannot load module '{name}': {code}")
        namespace = self._module_globals(name)
        exec(code, namespace)
        return PackageModule(name, namespace)

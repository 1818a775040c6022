"""``import`` inside hooks: the allow-listed standard stand-ins, ``ngx``, and sandboxed modules
found on ``python_package_path``.

A package module is compiled under the same policy as hooks and executed once per worker (the
first import, inside the importing run's budget); its globals then live as long as the worker,
so it can keep worker-level state such as caches. With ``python_code_cache off`` the runner
calls ``forget()`` before each run, so modules are re-read like hook files.

After the first import, ``import x`` costs a dict lookup, as ``require`` does in OpenResty
(``package.loaded``): each hook and module keeps what its imports resolved to in its own cache
(its globals' ``OWNER_KEY`` entry, a name hook code cannot spell), valid while the importer's
generation (package path, loaded modules) is unchanged.

``$hook_dir`` in a ``python_package_path`` pattern is the directory of the importing file (the
hook file, the config file of a ``*_by_python_block``, or the importing module's own file), so a
hook and its helpers can live together.
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

OWNER_KEY = "__modules__"  # per hook/module cache of resolved imports; not spellable
HOOK_DIR_KEY = "__hook_dir__"  # the importing file's directory, for $hook_dir; not spellable
HOOK_DIR = "$hook_dir"
_GENERATION = 0  # the owner cache's key for the importer generation it was filled in


class PackageModule:
    """A sandboxed module as its importers see it: its public globals, read-only.

    The module's live globals are also the instance's ``__dict__``, so ``picker.pick`` compiled
    as a plain attribute read (policy.py) is a dict lookup in C; private names (its builtins,
    import cache) stay out of reach: hook code cannot spell them, ``_getattr_`` refuses them."""

    __slots__ = ("__dict__", "_globals", "_name")

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_globals", namespace)
        object.__setattr__(self, "__dict__", namespace)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._globals:
            raise AttributeError(f"module '{self._name}' has no attribute '{name}'")
        return self._globals[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"module '{self._name}' is read-only in hooks")

    def __repr__(self) -> str:
        return f"<module '{self._name}' (sandboxed)>"


def _module_attribute(module: PackageModule, name: str) -> Any:
    """``module.name`` in hooks: straight to the module's globals (private names never get here)."""
    try:
        return module._globals[name]
    except KeyError:
        raise AttributeError(f"module '{module._name}' has no attribute '{name}'") from None


expose_dynamic(PackageModule, _module_attribute)


def _unconfigured(name: str) -> dict[str, Any]:
    raise RuntimeError("the hook importer is not configured")


class Importer:
    """The ``__import__`` of hook code. One per process; ``configure()`` sets the search path."""

    def __init__(self) -> None:
        self.package_path: tuple[str, ...] = ()  # (configure() sets what follows)
        self._modules: dict[str, PackageModule] = {}  # file path -> loaded module
        self._generation = 1  # bumped whenever a resolved import may change meaning
        self._loading: set[str] = set()
        self._special: dict[str, Any] = {}
        self._code: dict[tuple[str, str], CodeType] = {}  # (path, source) -> code
        self._module_globals: Callable[[str], dict[str, Any]] = _unconfigured  # set by the runner module

    def configure(self, package_path: tuple[str, ...], module_globals: Callable[[str], dict[str, Any]],
                  special: dict[str, Any]) -> None:
        if package_path != self.package_path:
            self._modules.clear()
            self._generation += 1
        self.package_path = package_path
        self._module_globals = module_globals
        self._special = special

    def forget(self) -> None:
        """Drop loaded package modules (python_code_cache off)."""
        self._modules.clear()
        self._generation += 1

    def __call__(self, name: str, globals: dict[str, Any] | None = None, locals: Any = None,
                 fromlist: Any = (), level: int = 0) -> Any:
        """``__import__``: a module imported before by the same hook or module costs two dict
        lookups (the hooks' builtins hold this bound method: a plain call, no ``__call__``
        slot). ``import a.b`` (no fromlist) is cached apart from ``from a.b import c``: the
        first returns ``a``."""
        try:  # (no globals, no cache yet, another generation, a first import: _first_import)
            owner = globals[OWNER_KEY]  # type: ignore[index]  # (None: the TypeError below)
            if owner[_GENERATION] == self._generation:
                return owner[name if fromlist or "." not in name else ("import", name)]
        except (KeyError, TypeError):
            pass
        return self._first_import(name, globals, fromlist, level)

    def _first_import(self, name: str, globals: dict[str, Any] | None, fromlist: Any, level: int) -> Any:
        owner = globals.get(OWNER_KEY) if globals is not None else None
        if owner is None or globals is None:
            return self._resolve(name, fromlist, level, {}, None)
        if owner.get(_GENERATION) != self._generation:
            owner.clear()
            owner[_GENERATION] = self._generation
        module = self._resolve(name, fromlist, level, owner, globals.get(HOOK_DIR_KEY))
        owner[name if fromlist or "." not in name else ("import", name)] = module
        return module

    def _resolve(self, name: str, fromlist: Any, level: int, owner: dict[Any, Any],
                 hook_dir: str | None) -> Any:
        if level:
            raise ImportError("relative imports are not allowed in hooks")
        top = name.partition(".")[0]
        special = self._special.get(top)
        if special is not None:  # ngx, ngx.balancer, ngx.upstream: attributes of the namespace
            return special
        if fromlist and name in PARENTS:  # `from scriptlb import balancers`; other names fail
            return PARENTS[name]
        module = standard_module(name, owner)
        if module is not None:
            # `import a.b` (no fromlist) returns `a`, as Python's __import__ does
            return PARENTS[top] if top != name and not fromlist else module
        return self._package_module(name, hook_dir)

    def _package_module(self, name: str, hook_dir: str | None) -> PackageModule:
        path = self.find(name, hook_dir)
        if path is None:
            raise ModuleNotFoundError(f"No module named '{name}' (not allowed, not on python_package_path)")
        module = self._modules.get(path)
        if module is not None:
            return module
        if path in self._loading:
            raise ImportError(f"circular import of module '{name}'")
        self._loading.add(path)
        try:
            module = self._load(name, path)
        finally:
            self._loading.discard(path)
        self._modules[path] = module
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

    def find(self, name: str, hook_dir: str | None = None) -> str | None:
        """The file ``import name`` loads for a file in ``hook_dir``, or None."""
        if not all(part.isidentifier() for part in name.split(".")):
            return None
        relative = name.replace(".", os.sep)
        for pattern in self.package_path:
            if pattern.startswith(HOOK_DIR):
                if hook_dir is None:
                    continue
                pattern = hook_dir + pattern[len(HOOK_DIR):]
            candidate = os.path.normpath(pattern.replace("?", relative))
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
        namespace[HOOK_DIR_KEY] = os.path.dirname(path)
        exec(code, namespace)
        return PackageModule(name, namespace)

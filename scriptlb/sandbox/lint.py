"""Load-time checks of hook code: the mistakes that compile but can only fail when a request
runs the hook, where each would fall back silently (``scriptlb -t``, start and reload report
them as config errors with the file:line).

* a name read but bound nowhere in the file and not a builtin or API global (``ballancer``);
  a name bound on some paths only is fine (that is a run-time matter);
* ``import re`` (not allowed), ``import mylib`` not found on ``python_package_path``, and a name
  a standard stand-in does not have (``from math import sqrtt``); modules found on the path are
  checked the same way, with their own file:line;
* an attribute the API objects do not have (``balancer.set_curent_peer``, ``ngx.lgo``,
  ``ngx.req.get_header``), and one a standard stand-in does not have (``math.sqrtt``), when
  the name is never rebound in the file.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from scriptlb.sandbox.guards import readable_names
from scriptlb.sandbox.modules import ALLOWED, PARENTS, standard_module
from scriptlb.sandbox.policy import API_GLOBALS

_FREE_NAMESPACES = frozenset({"var", "shared", "ctx"})  # ngx.var.X: any name is fine
_SPECIAL_MODULES = frozenset({"ngx", "ngx.balancer", "ngx.upstream"})


@dataclass(frozen=True)
class LintError:
    message: str  # as Python would say it at run time, e.g. "NameError: name 'x' is not defined"
    file: str
    line: int


@dataclass
class Context:
    """What the checks need from the hook runtime."""

    builtins: frozenset[str]  # names the sandbox's builtins provide
    api: dict[str, Any]  # "balancer"/"ngx"/"upstream" and "ngx.<namespace>" -> the API object
    find: Callable[[str, str | None], str | None]  # importer.find(name, hook_dir) -> file or None
    compile_tree: Callable[[str], ast.Module | str]  # file -> its AST, or an error text
    checked: set[str] = field(default_factory=set)  # module files already checked


def check(tree: ast.Module, filename: str, hook_dir: str | None, ctx: Context) -> list[LintError]:
    """Every finding in ``tree`` (and in the package modules it imports), in line order.
    Code inside a ``try`` whose handlers catch the error is the hook's own business (an optional
    module probed with ``try: import x`` / ``except ImportError``), so it is not reported."""
    found: list[LintError] = []
    bindings = _bindings(tree)
    found += _undefined_names(tree, filename, set(bindings), ctx)
    found += _imports(tree, filename, hook_dir, ctx)
    found += _attributes(tree, filename, bindings, ctx)
    caught = _caught_errors(tree)
    found = [e for e in found if e.file != filename or not _is_caught(e, caught)]
    return sorted(found, key=lambda e: (e.file != filename, e.file, e.line))


_CATCH_ALL = frozenset({"Exception", "BaseException", "*"})
_ERROR_FAMILY = {"NameError": {"NameError"}, "ImportError": {"ImportError"},
                 "ModuleNotFoundError": {"ModuleNotFoundError", "ImportError"},
                 "AttributeError": {"AttributeError"}}


def _caught_errors(tree: ast.AST) -> dict[int, set[str]]:
    """line -> the exception names caught around it (``*`` for a bare ``except:``)."""
    caught: dict[int, set[str]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names: set[str] = set()
        for handler in node.handlers:
            types = handler.type
            items = types.elts if isinstance(types, ast.Tuple) else [types]
            for item in items:
                names.add("*" if item is None else item.id if isinstance(item, ast.Name) else "?")
        for stmt in node.body:
            for inner in ast.walk(stmt):
                line = getattr(inner, "lineno", None)
                if line is not None:
                    caught.setdefault(line, set()).update(names)
    return caught


def _is_caught(error: LintError, caught: dict[int, set[str]]) -> bool:
    names = caught.get(error.line)
    if not names:
        return False
    kind = error.message.partition(":")[0]
    return bool(names & (_CATCH_ALL | _ERROR_FAMILY.get(kind, set())))


# --------------------------------------------------------------------------- names


def _bindings(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """name -> the nodes that bind it, anywhere in the file (any scope)."""
    bound: dict[str, list[ast.AST]] = {}

    def add(name: str, node: ast.AST) -> None:
        bound.setdefault(name, []).append(node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            add(node.id, node)
        elif isinstance(node, ast.arg):
            add(node.arg, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                add(alias.asname or alias.name.partition(".")[0], node)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            add(node.name, node)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                add(name, node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(node.name, node)
    return bound


def _undefined_names(tree: ast.AST, filename: str, bound: set[str], ctx: Context) -> Iterable[LintError]:
    known = bound | ctx.builtins | API_GLOBALS | {"print", "super", "__name__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known:
            yield LintError(f"NameError: name '{node.id}' is not defined", filename, node.lineno)


# --------------------------------------------------------------------------- imports


def _imports(tree: ast.AST, filename: str, hook_dir: str | None, ctx: Context) -> Iterable[LintError]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _import(alias.name, (), node, filename, hook_dir, ctx)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield LintError("ImportError: relative imports are not allowed in hooks", filename,
                                node.lineno)
                continue
            names = tuple(alias.name for alias in node.names)
            yield from _import(node.module or "", names, node, filename, hook_dir, ctx)


def _import(name: str, names: tuple[str, ...], node: ast.stmt, filename: str, hook_dir: str | None,
            ctx: Context) -> Iterable[LintError]:
    line = node.lineno
    if name in _SPECIAL_MODULES or name.partition(".")[0] == "ngx":
        return
    if names and name in PARENTS:
        for member in names:
            if member not in ("balancers",):
                yield LintError(f"ImportError: cannot import name '{member}' from '{name}'", filename, line)
        return
    if name in PARENTS:  # `import scriptlb` alone: only its submodule is importable
        yield LintError(_not_importable(name), filename, line)
        return
    if name in ALLOWED:
        module = standard_module(name, {})
        for member in names:
            if module is not None and not _has_member(module, member):
                yield LintError(f"ImportError: cannot import name '{member}' from '{name}' "
                                "(not visible to hooks)", filename, line)
        return
    path = ctx.find(name, hook_dir)
    if path is None:
        yield LintError(_not_importable(name), filename, line)
        return
    if path in ctx.checked:
        return
    ctx.checked.add(path)
    module_tree = ctx.compile_tree(path)
    if isinstance(module_tree, str):  # a syntax or policy error: the module's own file:line
        yield LintError(f"ImportError: cannot load module '{name}': {module_tree}", filename, line)
        return
    yield from check(module_tree, path, os.path.dirname(path), ctx)


def _not_importable(name: str) -> str:
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        allowed = ", ".join(sorted(ALLOWED))
        return f"ImportError: import of '{name}' is not allowed in hooks (allowed: {allowed})"
    return f"ModuleNotFoundError: No module named '{name}' (not on python_package_path)"


def _has_member(module: Any, member: str) -> bool:
    try:
        getattr(module, member)
    except AttributeError:
        return False
    return True


# --------------------------------------------------------------------------- attributes


def _attributes(tree: ast.AST, filename: str, bindings: dict[str, list[ast.AST]],
                ctx: Context) -> Iterable[LintError]:
    """``balancer.X``/``ngx.X``/``ngx.req.X``... and ``math.X`` for names never rebound."""
    imported = _imported_modules(bindings)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr.startswith("_"):
            continue
        base = node.value
        if isinstance(base, ast.Name):
            if base.id in API_GLOBALS and base.id not in bindings:
                yield from _api_attribute(base.id, node, filename, ctx)
            elif base.id in imported:
                module = imported[base.id]
                if not _has_member(module, node.attr):
                    yield LintError(f"AttributeError: module '{module._name}' has no attribute '{node.attr}' "
                                    "visible to hooks", filename, node.lineno)
        elif (isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "ngx"
              and "ngx" not in bindings and base.attr not in _FREE_NAMESPACES):
            yield from _api_attribute(f"ngx.{base.attr}", node, filename, ctx)


def _api_attribute(owner: str, node: ast.Attribute, filename: str, ctx: Context) -> Iterable[LintError]:
    target = ctx.api.get(owner)
    if target is None:
        return
    if node.attr not in readable_names(type(target)):
        yield LintError(f"AttributeError: '{owner}' has no attribute '{node.attr}'", filename, node.lineno)


def _imported_modules(bindings: dict[str, list[ast.AST]]) -> dict[str, Any]:
    """name -> standard stand-in, for names bound only by ``import X`` of one stand-in."""
    result: dict[str, Any] = {}
    for name, nodes in bindings.items():
        modules = set()
        for node in nodes:
            if not isinstance(node, ast.Import):
                break
            for alias in node.names:
                if (alias.asname or alias.name) == name and "." not in alias.name:
                    modules.add(alias.name)
        else:
            if len(modules) == 1:
                module = standard_module(modules.pop(), {})
                if module is not None:
                    result[name] = module
    return result

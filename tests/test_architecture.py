"""The package layout is the architecture: docs/architecture.md's module map lists exactly the
modules that exist, and imports point one way, from a higher layer to a lower one.

Read with ``ast`` only (nothing is imported or executed). An import inside a function counts
like one at the top of a module: a lazy import that reaches up is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scriptlb"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Layer of each sub-package (and of the modules left at the top), lowest first. A module may
# import its own layer and any lower one. The order is docs/architecture.md's "Layers".
LAYERS: dict[str, int] = {
    "scriptlb": 0,  # the package itself: version() only
    "scriptlb.config": 0,  # text -> frozen model; imports nothing else of scriptlb
    "scriptlb.logs": 1,
    "scriptlb.routing": 2,
    "scriptlb.state": 3,
    "scriptlb.balancing": 4,
    "scriptlb.sandbox": 5,
    "scriptlb.http": 6,
    "scriptlb.variables": 7,
    "scriptlb.hookrt": 8,
    "scriptlb.ops": 9,
    "scriptlb.request": 10,
    "scriptlb.stream": 11,
    "scriptlb.process": 12,
    "scriptlb.replay": 13,
    "scriptlb.testing": 14,
    "scriptlb.cli": 15,
    "scriptlb.__main__": 15,
}

# Imports from a lower layer to a higher one that are kept, each with the reason.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("scriptlb.config.builder", "scriptlb.http.tls"): (
        "nginx -t loads certificates and keys: a bad one must be a config error at its file:line, "
        "so the loader builds the SSL contexts once (tls.py itself reads only config.model)"
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "data" not in p.parts}


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS prefix of ``module``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        rank = LAYERS.get(".".join(parts[:end]))
        if rank is not None:
            return rank
    raise KeyError(module)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every scriptlb module ``path`` imports, at any depth of its code (``from a import b``
    names ``a.b`` when that is a module, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name == "scriptlb" or name.startswith("scriptlb.")}


def documented_modules() -> set[str]:
    """The module map: the ``scriptlb/...`` paths of the fenced block under "## Module map"
    (a path ending in ``/`` is its package's ``__init__.py``)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return {
        module_name(ROOT / m.group(1))
        for m in re.finditer(r"^\s*(scriptlb/(?:[\w/]*?\.py|(?:\w+/)*))(?=\s|$)", block, re.M)
    }


def test_every_module_is_in_the_module_map_and_every_listed_module_exists() -> None:
    modules = set(package_modules())
    listed = documented_modules()
    missing = sorted(modules - listed)
    stale = sorted(listed - modules)
    assert not missing, f"modules missing from docs/architecture.md's module map: {missing}"
    assert not stale, f"docs/architecture.md lists modules that do not exist: {stale}"


def test_every_module_has_a_layer() -> None:
    unranked = []
    for name in package_modules():
        try:
            layer_of(name)
        except KeyError:
            unranked.append(name)
    assert not unranked, f"modules of no layer (add their package to LAYERS): {unranked}"


def test_imports_point_down_the_layers() -> None:
    modules = package_modules()
    known = set(modules)
    upward = []
    for name, path in modules.items():
        for target in sorted(imported_modules(path, known)):
            if layer_of(target) > layer_of(name) and (name, target) not in ALLOWED_UPWARD:
                upward.append(f"{name} (layer {layer_of(name)}) -> {target} (layer {layer_of(target)})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_every_allowed_upward_import_still_exists() -> None:
    """An allow-list entry outlives its import only by mistake: remove it with the import."""
    modules = package_modules()
    known = set(modules)
    for (source, target), reason in ALLOWED_UPWARD.items():
        assert reason
        assert target in imported_modules(modules[source], known), (source, target)
        assert layer_of(target) > layer_of(source), (source, target)


@pytest.mark.parametrize("hook_name", ["scriptlb.balancers"])
def test_hook_facing_module_names_are_not_package_modules(hook_name: str) -> None:
    """Hooks import ``scriptlb.balancers`` from the sandbox's stand-ins; no real module of that
    name may come back, or the two would be confused."""
    assert hook_name not in package_modules()
    assert f'"{hook_name}"' in (PACKAGE / "sandbox" / "modules.py").read_text(encoding="utf-8")

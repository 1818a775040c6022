"""nginx-syntax configuration: ``load()`` turns a config file into the frozen ``MainConf``.

lexer.py (statements, file:line) -> parser.py (directive tree, includes) -> directives.py (the
table: contexts, arity, handlers) -> builder.py (inheritance, upstreams, defaults) -> model.py.
"""

from __future__ import annotations

import importlib
import os

from scriptlb.config.builder import build
from scriptlb.config.errors import ConfigError
from scriptlb.config.model import MainConf
from scriptlb.config.parser import parse

__all__ = ["ConfigError", "MainConf", "load", "load_and_check", "resolve_paths"]

DEFAULT_CONF = "conf/scriptlb.conf"


def resolve_paths(conf_file: str | None, prefix: str | None) -> tuple[str, str]:
    """(absolute config file, absolute prefix) as nginx resolves -c and -p: the prefix
    defaults to the current directory and a relative -c is taken under the prefix."""
    abs_prefix = os.path.abspath(prefix or os.getcwd())
    path = os.path.normpath(os.path.join(abs_prefix, conf_file or DEFAULT_CONF))
    return path, abs_prefix


def load(conf_file: str, prefix: str | None = None, globals_: str | None = None) -> MainConf:
    """Load ``conf_file`` (relative: under the prefix) with ``-g`` style ``globals_``.

    Raises ConfigError whose ``str()`` is nginx's ``[emerg] ... in /abs/file:line`` text.
    Paths inside the config (logs, pid, hooks, package paths) come out absolute, resolved
    against ``prefix`` (default: the current directory).
    """
    path, abs_prefix = resolve_paths(conf_file, prefix)
    result = parse(path, globals_)
    return build(result.nodes, path, abs_prefix, result.files)


def load_and_check(conf_file: str, prefix: str | None = None, globals_: str | None = None) -> MainConf:
    """``load()``, then compile every hook (``scriptlb.hooks.precompile``) so a hook's syntax
    or sandbox-policy error is a config error too. Skipped only while that module is absent."""
    conf = load(conf_file, prefix, globals_)
    try:
        hooks = importlib.import_module("scriptlb.hooks")
    except ModuleNotFoundError as e:
        if e.name != "scriptlb.hooks":
            raise
        return conf
    precompile = getattr(hooks, "precompile", None)
    if precompile is not None:
        precompile(conf)
    return conf

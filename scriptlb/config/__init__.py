"""nginx-syntax configuration: ``load()`` turns a config file into the frozen ``MainConf``.

lexer.py (statements, file:line) -> parser.py (directive tree, includes) -> directives.py (the
table: contexts, arity, handlers) -> builder.py (inheritance, upstreams, defaults) -> model.py.
"""

from __future__ import annotations

import os

from scriptlb.config.builder import build
from scriptlb.config.errors import ConfigError
from scriptlb.config.model import MainConf
from scriptlb.config.parser import parse

__all__ = [
    "ConfigError", "MainConf", "default_prefix", "load", "package_prefix", "resolve_paths",
]

DEFAULT_CONF = "conf/scriptlb.conf"


def package_prefix() -> str:
    """The prefix shipped inside the installed package: its default config and example hooks
    (``scriptlb/data/conf``, ``scriptlb/data/hooks``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def default_prefix(conf_file: str | None) -> str:
    """The prefix when -p is not given: the current directory when the config file (-c, else
    conf/scriptlb.conf) is there, as in a checkout or an operator's directory; otherwise the
    installed package's when it has that file, so ``scriptlb`` or ``scriptlb -c
    conf/scriptlb.conf`` runs the shipped default config after a ``pip install``."""
    cwd = os.getcwd()
    wanted = conf_file or DEFAULT_CONF
    if os.path.isabs(wanted) or os.path.isfile(os.path.join(cwd, wanted)):
        return cwd
    packaged = package_prefix()
    return packaged if os.path.isfile(os.path.join(packaged, wanted)) else cwd


def resolve_paths(conf_file: str | None, prefix: str | None) -> tuple[str, str]:
    """(absolute config file, absolute prefix) as nginx resolves -c and -p: a relative -c is
    taken under the prefix; the prefix defaults as ``default_prefix`` says."""
    abs_prefix = os.path.abspath(prefix or default_prefix(conf_file))
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
    from scriptlb.config.rewrite import declared_variables
    from scriptlb.config.templates import DECLARED

    token = DECLARED.set(declared_variables(result.nodes))
    try:
        return build(result.nodes, path, abs_prefix, result.files)
    finally:
        DECLARED.reset(token)

"""``map SOURCE $variable { ... }`` blocks (ngx_http_map_module), read and checked at load time.

The block's lines are not directives: each is ``VALUE RESULT;`` (or ``default``, ``hostnames``,
``volatile``; ``include`` is expanded by the parser). The words, their order of checks and the
error texts are ngx_http_map_module's. ``scriptlb.variables.maps`` evaluates the result; the ``stream``
module reads the same blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scriptlb.config.errors import ConfigError
from scriptlb.config.model import MapConf, MapEntry, Template
from scriptlb.config.parser import Node
from scriptlb.config.templates import TemplateError, compile_template


def map_variable_name(node: Node) -> str:
    """The variable a ``map`` node defines (lower-case, without "$")."""
    name = node.args[1]
    if not name.startswith("$") or len(name) < 2:
        raise ConfigError(f'invalid variable name "{name}"', node.source)
    return name[1:].lower()


RegexCheck = Callable[[Node, str, bool], None]


def parse_map(node: Node, check_regex: RegexCheck) -> MapConf:
    """The MapConf of a ``map`` block node (two arguments, children); ``check_regex`` compiles a
    pattern as the runtime will and raises the config error (shared with ``location``)."""
    variable = map_variable_name(node)
    source = _template(node, node.args[0])
    entries: list[MapEntry] = []
    seen: set[str] = set()
    default: Template | None = None
    flags = {"hostnames": False, "volatile": False}
    for line in node.children or ():
        if line.children is not None:
            raise ConfigError('unexpected "{"', line.source)
        words = (line.name, *line.args)
        if len(words) == 1 and words[0] in flags:
            flags[words[0]] = True
            continue
        if len(words) != 2:
            raise ConfigError("invalid number of the map parameters", line.source)
        key, raw_value = words
        value = _template(line, raw_value)
        if key == "default":
            if default is not None:
                raise ConfigError("duplicate default map parameter", line.source)
            default = value
            continue
        entries.append(_entry(line, key, value, flags["hostnames"], seen, check_regex))
    return MapConf(
        variable=variable,
        source=source,
        entries=tuple(entries),
        default=default,
        hostnames=flags["hostnames"],
        volatile=flags["volatile"],
    )


def _entry(
    line: Node, key: str, value: Template, hostnames: bool, seen: set[str], check_regex: RegexCheck
) -> MapEntry:
    if key.startswith("~"):
        caseless = key.startswith("~*")
        pattern = key[2:] if caseless else key[1:]
        check_regex(line, pattern, caseless)
        return MapEntry("regex", pattern, value, caseless)
    if key.startswith("\\"):  # "\default", "\~x": the text itself, not the special word
        key = key[1:]
    # nginx adds the keys to a hash lower-cased: string values match case-insensitively
    key = key.lower()
    if key in seen:
        raise ConfigError(f'conflicting parameter "{key}"', line.source)
    seen.add(key)
    if hostnames and _is_wildcard(key):
        if not _valid_wildcard(key):
            raise ConfigError(f'invalid hostname or wildcard "{key}"', line.source)
        return MapEntry("wildcard", key, value)
    return MapEntry("exact", key, value)


def _is_wildcard(key: str) -> bool:
    return key.startswith(("*", ".")) or key.endswith("*")


def _valid_wildcard(key: str) -> bool:
    """nginx's ngx_hash_add_key: one "*" as a whole first or last label, or a leading dot."""
    if key.startswith("*."):
        rest = key[2:]
    elif key.startswith("."):
        rest = key[1:]
    elif key.endswith(".*"):
        rest = key[:-2]
    else:
        return False
    return bool(rest) and "*" not in rest and not rest.startswith(".") and not rest.endswith(".")


def _template(node: Node, raw: str) -> Template:
    try:
        return compile_template(raw)
    except TemplateError as e:
        raise ConfigError(str(e), node.source) from None


def declared_map_variables(nodes: Sequence[Node]) -> frozenset[str]:
    """The variables the ``map`` and ``geo`` blocks of the http blocks in ``nodes`` define (pre-scan: a
    map may be used above the lines that define it, as nginx resolves names at the end)."""
    names: set[str] = set()
    for node in nodes:
        if node.name != "http" or node.children is None:
            continue
        for child in node.children:
            if child.name == "map" and len(child.args) == 2 and child.args[1].startswith("$"):
                names.add(child.args[1][1:].lower())
            elif child.name == "geo" and child.args and child.args[-1].startswith("$"):
                names.add(child.args[-1][1:].lower())
    return frozenset(names)

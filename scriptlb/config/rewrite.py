"""The rewrite module's directives (ngx_http_rewrite_module): ``set``, ``if``, ``rewrite``,
``break``, and ``return`` inside ``if``. Each level keeps its directives in order, as
``RewriteOp``s compiled at load time (scriptlb.request.rewrite runs them).

Inside ``if`` only the rewrite module's own directives are accepted (nginx's "if in location"
also takes content directives, a nested location scriptlb does not have).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from scriptlb.config.drafts import LocationDraft
from scriptlb.config.model import ReturnConf, RewriteOp

if TYPE_CHECKING:
    from scriptlb.config.drafts import LevelDraft

_NAME = re.compile(r"[A-Za-z0-9_]+")
_FLAGS = ("last", "break", "redirect", "permanent")
_OPERATORS = ("=", "!=", "~", "~*", "!~", "!~*")


@dataclass(eq=False)
class IfDraft(LocationDraft):
    """An ``if`` block being read: its rewrite directives in order (``ops``); in a location, the
    other directives it holds make it a location of its own (``in_location``)."""

    ops: list[DraftOp] = field(default_factory=list)
    in_location: bool = False

    def has_content(self) -> bool:
        """Whether the block holds more than rewrite directives."""
        return bool(self.values) or self.proxy_pass is not None or self.access_logs is not None


# a level's directive as read: an ``if`` comes with the block read after it (the builder joins them)
DraftOp: TypeAlias = "RewriteOp | tuple[RewriteOp, IfDraft]"


# a named group of a PCRE regex: "(?<name>", "(?P<name>", "(?'name'"
_NAMED_GROUP = re.compile(r"\(\?(?:P?<|')([A-Za-z_][A-Za-z0-9_]*)[>']")


def declared_variables(nodes: Iterable[Any]) -> frozenset[str]:
    """The names every ``set $name`` of the config declares, and the named captures of its
    ``server_name`` regexes (nginx makes them variables), lower-cased."""
    names: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node.name == "set" and node.args and node.args[0].startswith("$"):
            names.add(node.args[0][1:].lower())
        elif node.name == "server_name":
            for arg in node.args:
                if arg.startswith("~"):
                    names.update(name.lower() for name in _NAMED_GROUP.findall(arg))
        if node.children:
            stack.extend(node.children)
    return frozenset(names)


def ops_of(draft: IfDraft | LevelDraft) -> list[DraftOp]:
    """A level's list of rewrite-module directives."""
    if isinstance(draft, IfDraft):
        return draft.ops
    ops: list[DraftOp] = draft.values.setdefault("rewrite_ops", [])
    return ops


def set_op(node: Any, template: Any) -> RewriteOp:
    name, value = node.args
    if not name.startswith("$") or not _NAME.fullmatch(name[1:]):
        raise ValueError(f'invalid variable name "{name}"')
    return RewriteOp("set", name=name[1:].lower(), value=template(node, value))


def rewrite_op(node: Any, template: Any, check_regex: Any) -> RewriteOp:
    pattern, replacement = node.args[0], node.args[1]
    flag = node.args[2] if len(node.args) == 3 else ""
    if flag and flag not in _FLAGS:
        raise ValueError(f'invalid parameter "{flag}"')
    check_regex(node, pattern, False)
    return RewriteOp("rewrite", value=template(node, replacement), pattern=pattern, flag=flag)


def if_op(node: Any, template: Any, check_regex: Any) -> RewriteOp:
    """``if (...)``: the lexer splits the condition at blanks, as nginx's does."""
    args = list(node.args)
    if not args or not args[0].startswith("(") or not args[-1].endswith(")"):
        raise ValueError(f'invalid condition "{" ".join(args)}"')
    args[0] = args[0][1:]
    args[-1] = args[-1][:-1]
    args = [a for a in args if a != ""] if len(args) > 1 else args
    if len(args) == 1 and args[0].startswith("$"):
        return RewriteOp("if", value=template(node, args[0]))
    if len(args) == 3 and args[0].startswith("$") and args[1] in _OPERATORS:
        operator, pattern = args[1], args[2]
        if "~" in operator:
            check_regex(node, pattern, operator.endswith("*"))
            return RewriteOp("if", value=template(node, args[0]), operator=operator, pattern=pattern)
        return RewriteOp("if", value=template(node, args[0]), operator=operator,
                         name=pattern, body=(), pattern="")
    if args and args[0].lstrip("!").startswith("-"):
        raise ValueError(f'file tests in "if" ("{args[0]}") are not supported by scriptlb')
    raise ValueError(f'invalid condition "{" ".join(node.args)}"')


def with_body(op: RewriteOp, ops: list[RewriteOp], location: Any = None) -> RewriteOp:
    return RewriteOp(op.kind, op.name, op.value, op.operator, op.pattern, op.flag, tuple(ops), op.ret,
                     location)


def return_op(ret: ReturnConf) -> RewriteOp:
    return RewriteOp("return", ret=ret)

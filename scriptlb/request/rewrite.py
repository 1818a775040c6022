"""The rewrite phase (ngx_http_rewrite_module): a location's ``set``, ``if``, ``rewrite``,
``break`` and ``return`` (in ``if``), compiled once per location from its RewriteOps into
closures; ``RewritePhase.run(exchange)`` runs them in order for a request.

Results: CONTINUE (all ran), BREAK (``break``, ``rewrite ... break``), LAST (``rewrite ...
last``: find the location again) and DONE (a ``return`` or an external redirect answered).
A rewritten URI without a flag is matched again once the directives ran, as nginx does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import ReturnConf, RewriteOp
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.routing.uri import quote_uri
from scriptlb.variables.evaluate import compile_template

CONTINUE, BREAK, LAST, DONE = 0, 1, 2, 3

Step = Callable[[Any], int]


class RewritePhase:
    __slots__ = ("_steps",)

    def __init__(self, ops: tuple[RewriteOp, ...]) -> None:
        self._steps = _compile(ops)

    def run(self, exchange: Any) -> int:
        return _run(self._steps, exchange)


def _run(steps: tuple[Step, ...], exchange: Any) -> int:
    for step in steps:
        result = step(exchange)
        if result != CONTINUE:
            return result
    return CONTINUE


def _compile(ops: tuple[RewriteOp, ...]) -> tuple[Step, ...]:
    return tuple(_COMPILERS[op.kind](op) for op in ops)


def _set(op: RewriteOp) -> Step:
    assert op.value is not None
    render = compile_template(op.value)
    name = op.name
    if name == "limit_rate":  # (nginx's set handler: a size, 0 when invalid)
        from scriptlb.request.rate import set_value

        plain = render
        render = lambda ex: set_value(plain(ex))  # noqa: E731

    def step(ex: Any) -> int:
        values = getattr(ex, "variables", None)  # (unset until the first `set`)
        if values is None:
            values = ex.variables = {}
        values[name] = render(ex)
        return CONTINUE

    return step


def _break(op: RewriteOp) -> Step:
    return lambda ex: BREAK


def _condition(op: RewriteOp) -> Callable[[Any], bool]:
    assert op.value is not None
    render = compile_template(op.value)
    operator = op.operator
    if operator == "":
        return lambda ex: render(ex) not in ("", "0")
    if operator in ("=", "!="):
        wanted = op.name
        if operator == "=":
            return lambda ex: render(ex) == wanted
        return lambda ex: render(ex) != wanted
    regex = compile_nginx_regex(op.pattern, operator.endswith("*"))
    negated = operator.startswith("!")

    def matches(ex: Any) -> bool:
        found = regex.search(render(ex))
        if found is None:
            return negated
        if not negated:
            ex.captures = (found.group(0), *found.groups(default=""))
        return not negated

    return matches


def _if(op: RewriteOp) -> Step:
    condition = _condition(op)
    body = _compile(op.body)
    location = op.location
    if location is None:
        def step(ex: Any) -> int:
            return _run(body, ex) if condition(ex) else CONTINUE

        return step

    def enter(ex: Any) -> int:
        # a block with directives of its own: the request goes on in its location (content
        # handler, proxy settings, headers) once the rewrite phase is over
        if not condition(ex):
            return CONTINUE
        ex.location = ex.server.location_of(location)
        return _run(body, ex)

    return enter


def _rewrite(op: RewriteOp) -> Step:
    assert op.value is not None
    regex = compile_nginx_regex(op.pattern, False)
    render = compile_template(op.value)
    flag = op.flag
    redirect_status = 301 if flag == "permanent" else 302

    def step(ex: Any) -> int:
        found = regex.search(ex.uri)
        if found is None:
            return CONTINUE
        ex.captures = (found.group(0), *found.groups(default=""))
        new = render(ex)
        if new.startswith(("http://", "https://")) or flag in ("redirect", "permanent"):
            ex.redirect(redirect_status, _with_args(new, ex.args))
            return DONE
        path, sep, args = new.partition("?")
        if sep:
            args = args[:-1] if args.endswith("?") else (f"{args}&{ex.args}" if ex.args and args else args)
            ex.set_uri(path, args or None)
        else:
            ex.set_uri(path, ex.args)
        if flag == "last":
            return LAST
        if flag == "break":
            return BREAK
        return CONTINUE

    return step


def _with_args(target: str, args: str | None) -> str:
    """A redirect keeps the request's arguments unless the replacement has its own "?"."""
    if target.endswith("?"):
        return target[:-1]
    if "?" in target or not args:
        return target
    return f"{target}?{args}"


def _return(op: RewriteOp) -> Step:
    ret = op.ret
    assert ret is not None
    answer = ReturnAnswer(ret)

    def step(ex: Any) -> int:
        ex.answer_return(ret.status, *answer.response(ex))
        return DONE

    return step


class ReturnAnswer:
    """(headers, body) of one ``return`` (body None: nginx's own page for the status)."""

    __slots__ = ("_getter", "status")

    def __init__(self, ret: ReturnConf) -> None:
        from scriptlb.variables.evaluate import compile_template_bytes

        self.status = ret.status
        self._getter = compile_template_bytes(ret.text) if ret.text is not None else None

    def response(self, ex: Any) -> tuple[bytes, bytes | None]:
        getter = self._getter
        if self.status in (301, 302, 303, 307, 308):
            if getter is None:
                return b"", None
            return b"Location: " + ex.absolute_location(getter(ex)) + b"\r\n", None
        if getter is None:
            return b"", (b"" if self.status < 300 else None)
        return b"Content-Type: text/plain\r\n", getter(ex)


_COMPILERS: dict[str, Callable[[RewriteOp], Step]] = {
    "set": _set,
    "break": _break,
    "if": _if,
    "rewrite": _rewrite,
    "return": _return,
}


def target_of(path: str, args: str | None) -> bytes:
    """The request target a rewritten URI is sent upstream as."""
    quoted = quote_uri(path)
    return (quoted + "?" + args if args is not None else quoted).encode("latin-1", "replace")

"""Server side includes (ngx_http_ssi_module) over the files the static handler serves and
over proxied responses (``SsiBody``: the body is collected whole first).

A body of a type ``ssi_types`` names, in a location with ``ssi on``, is split into text and
``<!--# command param="value" ... -->`` commands (``parse``, pure), then run in order
(``SsiRun``): ``include virtual=``/``file=`` runs a subrequest through the normal location
handling, in-process (``scriptlb.request.subrequest``), its body written in place or, with
``set=``, kept in an SSI variable; ``echo``, ``set``, ``config`` and
``if``/``elif``/``else``/``endif`` as nginx's. Subrequests run one after another (nginx runs
those without ``wait`` side by side; the output is the same). A command that fails writes
``config errmsg`` (unless ``ssi_silent_errors``) and logs why.

Whether a location runs SSI is decided at config load: a location without ``ssi on`` costs
nothing.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from scriptlb.config.model import SsiConf
from scriptlb.logs import errorlog
from scriptlb.request.subrequest import SubrequestResult, run_subrequest
from scriptlb.variables.evaluate import get_variable

ERRMSG = "[an error occurred while processing the directive]"
TIMEFMT = "%A, %d-%b-%Y %H:%M:%S %Z"
NONE = "(none)"

_COMMAND = re.compile(
    rb"<!--#\s*([A-Za-z_]+)((?:\s*[A-Za-z_]+\s*=\s*(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'))*)\s*-->", re.S
)
_PARAM = re.compile(r"([A-Za-z_]+)\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)')", re.S)
_VARIABLE = re.compile(r"\\(.)|\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))", re.S)
# which parameters each command takes (nginx's tables: an unknown one is an error)
_PARAMS = {
    "include": ("virtual", "file", "wait", "set", "stub"),
    "echo": ("var", "default", "encoding"),
    "set": ("var", "value"),
    "config": ("errmsg", "timefmt"),
    "if": ("expr",),
    "elif": ("expr",),
    "else": (),
    "endif": (),
}
_REQUIRED = {"echo": ("var",), "set": ("var", "value"), "if": ("expr",), "elif": ("expr",)}

Part = bytes | tuple[str, dict[str, str]]


class SsiError(Exception):
    """A command that cannot run: errmsg in the output, the reason in the error log."""


def parse(text: bytes) -> list[Part]:
    """The file as text parts (bytes) and commands (name, params); a ``<!--#`` that is not a
    well-formed command stays text."""
    parts: list[Part] = []
    pos = 0
    for match in _COMMAND.finditer(text):
        if match.start() > pos:
            parts.append(text[pos:match.start()])
        raw = match.group(2).decode("utf-8", "replace")
        params = {m.group(1).lower(): _unescape(m.group(2) if m.group(2) is not None else m.group(3))
                  for m in _PARAM.finditer(raw)}
        parts.append((match.group(1).decode("ascii").lower(), params))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def _unescape(value: str) -> str:
    """A quoted value's escaped quote characters (nginx keeps other backslashes for $ escapes)."""
    return value.replace('\\"', '"').replace("\\'", "'")


def applies(conf: SsiConf, content_type: bytes) -> bool:
    """Whether a response of ``content_type`` runs SSI (ssi_types)."""
    if conf.types == ("*",):
        return True
    return content_type.split(b";")[0].strip().decode("latin-1").lower() in conf.types


class SsiRun:
    """The commands of one response, run in order; ``done(body)`` gets the output."""

    __slots__ = (
        "_blocks",
        "_done",
        "_out",
        "_parts",
        "_pending",
        "conf",
        "encoding",
        "errmsg",
        "exchange",
        "timefmt",
        "variables",
    )

    def __init__(self, exchange: Any, conf: SsiConf, parts: list[Part],
                 done: Callable[[bytes], None]) -> None:
        self.exchange = exchange
        self.conf = conf
        self._parts = parts
        self._done = done
        self._out: list[bytes] = []
        self._pending: Any = None  # the subrequest in flight (cancel() when the client goes)
        self.variables: dict[str, str] = {}
        self.errmsg = ERRMSG
        self.timefmt = TIMEFMT
        self.encoding = "entity"
        # if/elif/else: one entry per open block: [output on, a branch was taken already]
        self._blocks: list[list[bool]] = []

    def start(self) -> None:
        self._resume(0)

    def cancel(self) -> None:
        """The client went away: the subrequest in flight goes too, nothing more runs."""
        pending, self._pending = self._pending, None
        self._parts = []
        self._done = _nothing
        if pending is not None:
            pending.cancel()

    def _output_on(self) -> bool:
        return all(block[0] for block in self._blocks)

    def _resume(self, index: int) -> None:
        parts = self._parts
        while index < len(parts):
            part = parts[index]
            index += 1
            if isinstance(part, bytes):
                if self._output_on():
                    self._out.append(part)
                continue
            name, params = part
            if name in ("if", "elif", "else", "endif"):
                self._conditional(name, params)
                continue
            if not self._output_on():
                continue
            try:
                if name == "include":
                    if self._include(params, index):
                        return  # resumed by the subrequest's end
                else:
                    self._command(name, params)
            except SsiError as err:
                self._error(str(err))
        self._finish()

    def _finish(self) -> None:
        done, self._done = self._done, _nothing
        done(b"".join(self._out))

    def _error(self, message: str) -> None:
        exchange = self.exchange
        errorlog.log_error("error", message, exchange.conn_id, errorlog.request_context(exchange))
        if not self.conf.silent_errors:
            self._out.append(self.errmsg.encode("utf-8"))

    def _check(self, name: str, params: dict[str, str]) -> None:
        known = _PARAMS.get(name)
        if known is None:
            raise SsiError(f'unknown SSI command "{name}"')
        for param, value in params.items():
            if param not in known:
                raise SsiError(f'invalid parameter name: "{param}" for command: "{name}"')
            if len(value) > self.conf.value_length:
                limit = self.conf.value_length
                raise SsiError(f'the parameter value is longer than "ssi_value_length" ({limit})')
        for param in _REQUIRED.get(name, ()):
            if param not in params:
                raise SsiError(f'mandatory "{param}" parameter is absent for "{name}" SSI command')

    def _command(self, name: str, params: dict[str, str]) -> None:
        self._check(name, params)
        if name == "echo":
            self._echo(params)
        elif name == "set":
            self.variables[params["var"].lower()] = self.evaluate(params["value"])
        elif name == "config":
            if "errmsg" in params:
                self.errmsg = params["errmsg"]
            if "timefmt" in params:
                self.timefmt = params["timefmt"]

    # ---------------------------------------------------------------- variables

    def variable(self, name: str) -> str | None:
        """An SSI variable (set by ``set`` or ``include set=``), else the request's."""
        name = name.lower()
        value = self.variables.get(name)
        if value is not None:
            return value
        if name in ("date_local", "date_gmt"):
            now = time.time()
            moment = time.localtime(now) if name == "date_local" else time.gmtime(now)
            return time.strftime(self.timefmt, moment)
        try:
            return get_variable(self.exchange, name)
        except KeyError:
            return None

    def evaluate(self, text: str) -> str:
        """``$name`` and ``${name}`` in a parameter's value (unknown ones empty; ``\\$`` a dollar)."""
        if "$" not in text and "\\" not in text:
            return text

        def one(match: re.Match[str]) -> str:
            if match.group(1) is not None:
                return match.group(1)
            return self.variable(match.group(2) or match.group(3)) or ""

        return _VARIABLE.sub(one, text)

    def _echo(self, params: dict[str, str]) -> None:
        encoding = params.get("encoding")
        if encoding is not None:
            if encoding in ("none", "url", "entity"):
                self.encoding = encoding
            else:
                exchange = self.exchange
                errorlog.log_error("error", f'unknown encoding "{encoding}" in the "echo" command',
                                   exchange.conn_id, errorlog.request_context(exchange))
        value = self.variable(params["var"])
        if value is None:
            value = params.get("default", NONE)
        if not value:
            return
        if self.encoding == "entity":
            value = html.escape(value, quote=True).replace("&#x27;", "'")
        elif self.encoding == "url":
            value = quote(value, safe="/?:@&=+$,;-_.!~*'()#%")
        self._out.append(value.encode("utf-8"))

    # ---------------------------------------------------------------- if

    def _conditional(self, name: str, params: dict[str, str]) -> None:
        blocks = self._blocks
        try:
            self._check(name, params)
            if name == "if":
                on = self._output_on() and self._test(params["expr"])
                blocks.append([on, on])
                return
            if not blocks:
                raise SsiError(f'the "{name}" command without the "if" command')
            block = blocks[-1]
            if name == "endif":
                blocks.pop()
            elif name == "else":
                block[0] = not block[1] and self._outer_on()
                block[1] = True
            else:  # elif
                on = not block[1] and self._outer_on() and self._test(params["expr"])
                block[0] = on
                block[1] = block[1] or on
        except SsiError as err:
            if self._output_on():
                self._error(str(err))

    def _outer_on(self) -> bool:
        return all(block[0] for block in self._blocks[:-1])

    def _test(self, expr: str) -> bool:
        """nginx's SSI conditions: ``$var`` (not empty), ``$var = text``, ``$var != text``,
        and ``/regex/`` as the right side (with ``!`` in front of the whole to negate)."""
        expr = expr.strip()
        negate = False
        if expr.startswith("!") and not expr.startswith("!="):
            negate, expr = True, expr[1:].strip()
        for op in ("!=", "="):
            left, sep, right = expr.partition(op)
            if sep:
                value = self.evaluate(left.strip())
                right = right.strip()
                if len(right) >= 2 and right[0] == "/" and right[-1] == "/":
                    try:
                        matched = re.search(right[1:-1], value) is not None
                    except re.error as err:
                        raise SsiError(f"invalid regex in the SSI condition: {err}") from None
                else:
                    matched = value == self.evaluate(right)
                result = matched if op == "=" else not matched
                return result != negate
        return bool(self.evaluate(expr)) != negate

    # ---------------------------------------------------------------- include

    def _include(self, params: dict[str, str], resume_at: int) -> bool:
        """Start the subrequest; True when it runs (``_resume`` is called at its end)."""
        self._check("include", params)
        virtual, file = params.get("virtual"), params.get("file")
        if virtual is not None and file is not None:
            raise SsiError(f'inlcusion may be either virtual="{virtual}" or file="{file}"')
        if virtual is None and file is None:
            raise SsiError("no parameter in \"include\" SSI command")
        if "set" in params and "stub" in params:
            raise SsiError('"set" and "stub" cannot be used together in "include" SSI command')
        wait = params.get("wait")
        if wait is not None and wait.lower() not in ("yes", "no"):
            raise SsiError(f'invalid value "{wait}" in the "wait" parameter')
        if "stub" in params:
            raise SsiError(f'"stub"="{params["stub"]}" for "include" not found')
        uri = self.evaluate(virtual if virtual is not None else file or "")
        if not uri.startswith("/"):  # relative to the including URI's directory, as nginx
            base = self.exchange.uri
            uri = base[: base.rfind("/") + 1] + uri
        path = uri.partition("?")[0]
        if "/../" in path + "/" or "\0" in uri:
            raise SsiError(f'unsafe URI "{uri}" was detected')
        target = params.get("set")

        def included(result: SubrequestResult) -> None:
            self._pending = None
            try:
                if target is not None:
                    self.variables[target.lower()] = result.body.decode("utf-8", "replace")
                else:
                    self._out.append(result.body)
                self._resume(resume_at)
            except Exception as exc:
                self.exchange.crashed(exc, "running SSI")

        self._pending = run_subrequest(self.exchange, uri, included)
        return True


_DROPPED_BY_SSI = (b"content-length", b"etag", b"last-modified", b"accept-ranges")


class SsiBody:
    """A proxied response whose body runs SSI (a body filter, see scriptlb.request.store): the
    body is collected whole, the commands run, then the head (without the peer's length,
    validators and ranges, as nginx's SSI header filter) goes out with the output."""

    __slots__ = ("_chunks", "_conf", "_headers", "_owner", "_reason", "_run", "_status")
    holds_head = True  # (the proxy does not send the head: this filter does, at the end)

    def __init__(self, owner: Any, conf: SsiConf, status: int, headers: bytes, reason: bytes | None) -> None:
        self._owner = owner
        self._conf = conf
        self._status = status
        self._reason = reason
        lines = headers.split(b"\r\n")
        self._headers = b"".join(line + b"\r\n" for line in lines
                                 if line and line.split(b":", 1)[0].strip().lower() not in _DROPPED_BY_SSI)
        self._chunks: list[bytes] = []
        self._run: SsiRun | None = None

    @property
    def holding(self) -> bool:
        return False

    def body(self, data: bytes) -> None:
        self._chunks.append(data)

    def complete(self, finish: Callable[[], None]) -> None:
        exchange = self._owner.exchange

        def done(output: bytes) -> None:
            self._run = None
            if exchange.conn.closed:
                return
            exchange.conn.send_head(self._status, self._headers, len(output), reason=self._reason)
            exchange.conn.send_body(output)
            finish()

        self._run = SsiRun(exchange, self._conf, parse(b"".join(self._chunks)), done)
        self._chunks = []
        self._run.start()

    def cancel(self) -> None:
        run, self._run = self._run, None
        self._chunks = []
        if run is not None:
            run.cancel()


def _nothing(body: bytes) -> None:
    """(a run's output, once given)"""

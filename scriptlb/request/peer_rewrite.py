"""A peer's Location, Refresh and Set-Cookie headers edited for the client (ngx_http_proxy_module's
``proxy_redirect``, ``proxy_cookie_domain``, ``proxy_cookie_path``, ``proxy_cookie_flags``).

Rules are compiled at load; a response is looked at only when its head had one of those headers
(``ResponseHead.rewritable``). Semantics are nginx's:

- Location: the first rule that matches rewrites it; a result starting with "/" is made absolute
  as nginx's own redirects are (absolute_redirect...). Refresh: the same rules, from "url=" on.
- a "prefix" rule replaces the text's start, a "regex" rule the whole text (``$1``... are its
  captures), a "domain" rule (proxy_cookie_domain) the whole domain, a leading dot kept.
- Set-Cookie: the Domain and Path attributes go through their rules (the first match wins), then
  the first proxy_cookie_flags line naming the cookie edits Secure, HttpOnly and SameSite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import CookieFlagsConf, ProxyConf, TextRewrite
from scriptlb.config.regex import compile_nginx_regex

Render = Callable[[Any], str]


class TextRule:
    """One compiled rule: ``apply(exchange, text) -> new text | None`` (None: no match)."""

    __slots__ = ("kind", "pattern", "regex", "replacement")

    def __init__(self, conf: TextRewrite) -> None:
        from scriptlb.variables.evaluate import compile_template

        self.kind = conf.kind
        self.replacement: Render = compile_template(conf.replacement)
        self.pattern: Render | None = compile_template(conf.pattern) if conf.pattern is not None else None
        self.regex = compile_nginx_regex(conf.regex, conf.caseless) if conf.kind == "regex" else None

    def apply(self, exchange: Any, text: str) -> str | None:
        if self.regex is not None:
            match = self.regex.search(text)
            if match is None:
                return None
            exchange.captures = (match.group(0), *(g or "" for g in match.groups()))
            return self.replacement(exchange)
        assert self.pattern is not None
        pattern = self.pattern(exchange)
        if self.kind == "domain":
            dot = "." if text.startswith(".") else ""
            if text[len(dot):].lower() != pattern.lower():
                return None
            return dot + self.replacement(exchange)
        if not text.startswith(pattern):
            return None
        return self.replacement(exchange) + text[len(pattern):]


def _first(rules: tuple[TextRule, ...], exchange: Any, text: str) -> str | None:
    for rule in rules:
        result = rule.apply(exchange, text)
        if result is not None:
            return result
    return None


def header_rewrite(conf: ProxyConf) -> Callable[[Any, bytes], bytes] | None:
    """``rewrite(exchange, lines) -> lines`` for a location's proxy settings; None when it
    has no rule at all."""
    redirects = tuple(TextRule(r) for r in conf.redirects)
    domains = tuple(TextRule(r) for r in conf.cookie_domains)
    paths = tuple(TextRule(r) for r in conf.cookie_paths)
    flags = tuple(CookieFlags(f) for f in conf.cookie_flags)
    if not (redirects or domains or paths or flags):
        return None
    cookies = bool(domains or paths or flags)

    def rewrite(exchange: Any, lines: bytes) -> bytes:
        out = []
        for line in lines.split(b"\r\n"):
            if not line:
                continue
            name, _, value = line.partition(b": ")
            lower = name.lower()
            new: str | None = None
            if lower == b"location" and redirects:
                new = _first(redirects, exchange, value.decode("latin-1"))
                if new is not None and new.startswith("/"):
                    new = exchange.absolute_location(new.encode("latin-1", "replace")).decode("latin-1")
            elif lower == b"refresh" and redirects:
                new = _refresh(redirects, exchange, value.decode("latin-1"))
            elif lower == b"set-cookie" and cookies:
                new = _cookie(exchange, value.decode("latin-1"), domains, paths, flags)
            if new is not None:
                line = name + b": " + new.encode("latin-1", "replace")
            out.append(line + b"\r\n")
        return b"".join(out)

    return rewrite


def _refresh(rules: tuple[TextRule, ...], exchange: Any, value: str) -> str | None:
    start = value.lower().find("url=")
    if start == -1:
        return None
    start += 4
    new = _first(rules, exchange, value[start:])
    return None if new is None else value[:start] + new


# --------------------------------------------------------------------------- Set-Cookie


def parse_cookie(value: str) -> list[list[str | None]]:
    """``name=value; Attr=x; Flag`` -> [[key, value or None], ...] as nginx splits it (spaces
    around names and values trimmed; the first pair is the cookie itself)."""
    attrs: list[list[str | None]] = []
    for part in value.split(";"):
        key, eq, val = part.partition("=")
        attrs.append([key.strip(" "), val.strip(" ") if eq else None])
    return attrs


def _cookie(exchange: Any, value: str, domains: tuple[TextRule, ...], paths: tuple[TextRule, ...],
            flags: tuple[CookieFlags, ...]) -> str | None:
    attrs = parse_cookie(value)
    if attrs[0][1] is None:  # not name=value: left alone
        return None
    changed = False
    for attr in attrs[1:]:
        key, val = attr
        if val is None or key is None:
            continue
        lower = key.lower()
        rules = domains if lower == "domain" else paths if lower == "path" else ()
        new = _first(rules, exchange, val) if rules else None
        if new is not None:
            attr[1] = new
            changed = True
    name = attrs[0][0] or ""
    for rule in flags:
        if rule.names(exchange, name):
            changed = rule.edit(exchange, attrs) or changed
            break
    if not changed:
        return None
    return "; ".join(key if val is None else f"{key}={val}" for key, val in attrs if key is not None)


_SECURE = {"secure": True, "nosecure": False}
_HTTPONLY = {"httponly": True, "nohttponly": False}
_SAMESITE = {"samesite=strict": "Strict", "samesite=lax": "Lax", "samesite=none": "None", "nosamesite": ""}
_SAMESITE_ORDER = ("Strict", "Lax", "None", "")  # nginx's precedence when several are given


class CookieFlags:
    """One ``proxy_cookie_flags`` line."""

    __slots__ = ("cookie", "flags", "regex")

    def __init__(self, conf: CookieFlagsConf) -> None:
        from scriptlb.variables.evaluate import compile_template

        self.cookie: Render | None = compile_template(conf.cookie) if conf.cookie is not None else None
        self.regex = compile_nginx_regex(conf.regex, True) if conf.cookie is None else None
        self.flags = tuple(compile_template(f) for f in conf.flags)

    def names(self, exchange: Any, name: str) -> bool:
        if self.regex is not None:
            return self.regex.search(name) is not None
        assert self.cookie is not None
        return self.cookie(exchange).lower() == name.lower()

    def edit(self, exchange: Any, attrs: list[list[str | None]]) -> bool:
        """Apply the flags; False when none is valid (the cookie is then left as it was)."""
        secure: set[bool] = set()
        httponly: set[bool] = set()
        samesite: set[str] = set()
        for render in self.flags:
            flag = render(exchange).lower()
            if flag in _SECURE:
                secure.add(_SECURE[flag])
            elif flag in _HTTPONLY:
                httponly.add(_HTTPONLY[flag])
            elif flag in _SAMESITE:
                samesite.add(_SAMESITE[flag])
        if not (secure or httponly or samesite):
            return False
        want_secure = True in secure or (False if secure else None)
        want_httponly = True in httponly or (False if httponly else None)
        want_samesite = next((s for s in _SAMESITE_ORDER if s in samesite), None)
        _set_flag(attrs, "secure", "Secure", want_secure)
        _set_flag(attrs, "httponly", "HttpOnly", want_httponly)
        _set_samesite(attrs, want_samesite)
        return True


def _set_flag(attrs: list[list[str | None]], lower: str, spelled: str, want: bool | None) -> None:
    """True: present (added if missing); False: every occurrence removed; None: untouched."""
    if want is None:
        return
    found = False
    for attr in attrs[1:]:
        if attr[0] is not None and attr[0].lower() == lower:
            if not want:
                attr[0] = None
            found = True
    if want and not found:
        attrs.append([spelled, None])


def _set_samesite(attrs: list[list[str | None]], want: str | None) -> None:
    if want is None:
        return
    found = False
    for attr in attrs[1:]:
        if attr[0] is not None and attr[0].lower() == "samesite":
            found = True
            if not want:
                attr[0] = None
            elif (attr[1] or "").lower() != want.lower():
                attr[0], attr[1] = "SameSite", want
    if want and not found:
        attrs.append(["SameSite", want])

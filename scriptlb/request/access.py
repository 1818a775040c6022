"""nginx's access phase: ``allow``/``deny`` (ngx_http_access_module), then ``auth_basic``.

``access_phase(conf)`` returns None for a location with neither (the proxy then pays one
attribute test per request), else a callable ``check(exchange) -> (status, headers) | None``:
None lets the request through, a status (403, 401, 500) is answered with nginx's page. As
nginx's default ``satisfy all``, both must pass; the rules are checked first.

Password files are read on use, as nginx reads them per request, but parsed again only when
the file changed (size, mtime). Hashes: bcrypt (``$2a$``/``$2b$``/``$2y$``), ``{SHA}``,
``{SSHA}``, ``{PLAIN}``, MD5-crypt (``$apr1$`` and ``$1$``). A bcrypt check costs tens of
milliseconds of the worker's time by design; a successful (hash, password) pair is remembered
(bounded) so a client sending the same credentials again does not pay it per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from typing import Any

from scriptlb.config.model import AccessRule, LocationConf
from scriptlb.logs import errorlog

Verdict = tuple[int, bytes] | None
Network = ipaddress.IPv4Network | ipaddress.IPv6Network | str

_VERIFIED_MAX = 1024  # remembered successful password checks per worker


# a Verdict that is no refusal: the check's callable answered the request itself (try_files)
ANSWERED: tuple[int, bytes] = (0, b"")


def access_phase(conf: LocationConf, try_files: Callable[[Any], bool] | None = None
                 ) -> Callable[[Any], Verdict] | None:
    """The location's check (None: nothing to check), followed by ``try_files`` (nginx's
    phase after access) when the location has it: one callable, one test per request."""
    check = _access_check(conf.access, conf.auth_basic, conf.auth_basic_user_file)
    if check is not None and conf.limit_except is not None:
        # (the methods limit_except does not name had the block's check instead: LimitExcept)
        check = _for_methods(conf.limit_except.methods, check)
    if try_files is None:
        return check

    def check_then_try_files(exchange: Any) -> Verdict:
        refused = check(exchange) if check is not None else None
        if refused is not None:
            return refused
        return ANSWERED if try_files(exchange) else None

    return check_then_try_files


def _for_methods(methods: frozenset[str], check: Callable[[Any], Verdict]) -> Callable[[Any], Verdict]:
    def only_named(exchange: Any) -> Verdict:
        return check(exchange) if exchange.method in methods else None

    return only_named


class LimitExcept:
    """``limit_except``, run where the location's rewrite phase runs (``run(exchange)``, the
    rewrite phase's contract): the methods it names go on to the location's rewrite directives
    (``inner``); nginx gives every other method the block's configuration, where those do not
    run: its check decides at once."""

    __slots__ = ("check", "inner", "methods")

    def __init__(self, conf: LocationConf, inner: Any) -> None:
        limit = conf.limit_except
        assert limit is not None
        self.methods = limit.methods
        self.check = _access_check(limit.access, limit.auth_basic, limit.auth_basic_user_file)
        self.inner = inner

    def run(self, exchange: Any) -> int:
        from scriptlb.request.rewrite import BREAK, DONE

        if exchange.method in self.methods:
            return self.inner.run(exchange) if self.inner is not None else BREAK
        refused = self.check(exchange) if self.check is not None else None
        if refused is None:
            return BREAK
        exchange.finish_with_page(*refused)
        return DONE


def _access_check(access: tuple[AccessRule, ...], realm: str | None, user_file: str | None
                  ) -> Callable[[Any], Verdict] | None:
    rules = _compile_rules(access) if access else None
    auth = BasicAuth(realm, user_file) if user_file else None
    if rules is None and auth is None:
        return None

    def check(exchange: Any) -> Verdict:
        if rules is not None and not _allowed(rules, exchange):
            errorlog.log_error("error", "access forbidden by rule", exchange.conn_id,
                               errorlog.request_context(exchange))
            return 403, b""
        if auth is not None:
            return auth.check(exchange)
        return None

    return check


# --------------------------------------------------------------------------- allow / deny


def _compile_rules(rules: tuple[AccessRule, ...]) -> list[tuple[bool, Network]]:
    return [(rule.allow, rule.network if rule.network in ("all", "unix:") else
             ipaddress.ip_network(rule.network)) for rule in rules]


def _allowed(rules: list[tuple[bool, Network]], client: Any) -> bool:
    """The first matching rule decides; none matching allows (nginx's NGX_DECLINED)."""
    remote = client.remote_addr
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if remote != "unix:":
        address = ipaddress.ip_address(remote)
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:  # nginx checks an IPv4-mapped IPv6 client against IPv4 rules too
            address = mapped
    for allow, network in rules:
        if isinstance(network, str):  # "all", "unix:"
            if network == "all" or address is None:
                return allow
        elif address is not None and address.version == network.version and address in network:
            return allow
    return True


def rules_check(access: tuple[AccessRule, ...]) -> Callable[[Any], bool]:
    """``allow``/``deny`` lines as one test of a client (anything with ``remote_addr``: an
    exchange, a stream session): True lets it through."""
    rules = _compile_rules(access)
    return lambda client: _allowed(rules, client)


def address_matcher(networks: Sequence[str]) -> Callable[[Any], bool]:
    """Whether a client's address is in ``networks`` (``allow``'s words: a normalized CIDR,
    "unix:" or "all"); an empty list matches nobody."""
    rules = [*_compile_rules(tuple(AccessRule(True, network) for network in networks)), (False, "all")]
    return lambda exchange: _allowed(rules, exchange)


# --------------------------------------------------------------------------- auth_basic


class BasicAuth:
    def __init__(self, realm: str | None, user_file: str | None) -> None:
        assert realm is not None and user_file is not None
        self.realm = realm
        self.user_file = user_file
        self.challenge = b'WWW-Authenticate: Basic realm="' + realm.encode("latin-1", "replace") + b'"\r\n'
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._verified: dict[bytes, None] = {}

    def check(self, exchange: Any) -> Verdict:
        credentials = basic_credentials(exchange.header("authorization"))
        ctx = errorlog.request_context(exchange)
        if credentials is None:
            errorlog.log_error("info", "no user/password was provided for basic authentication",
                               exchange.conn_id, ctx)
            return 401, self.challenge
        user, password = credentials
        try:
            users = self._load()
        except OSError as err:
            missing = err.errno == 2
            errorlog.log_error("error" if missing else "crit",
                               f'open() "{self.user_file}" failed {errorlog.os_error_text(err)}',
                               exchange.conn_id, ctx)
            return (403 if missing else 500), b""
        stored = users.get(user)
        if stored is None:
            errorlog.log_error("error", f'user "{user}" was not found in "{self.user_file}"',
                               exchange.conn_id, ctx)
            return 401, self.challenge
        if not self._verify(password, stored):
            errorlog.log_error("error", f'user "{user}": password mismatch', exchange.conn_id, ctx)
            return 401, self.challenge
        return None

    def _load(self) -> dict[str, str]:
        st = os.stat(self.user_file)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with open(self.user_file, encoding="latin-1") as f:
                self._users = parse_htpasswd(f.read())
            self._stamp = stamp
        return self._users

    def _verify(self, password: str, stored: str) -> bool:
        key = hashlib.sha256(f"{stored}\0{password}".encode("latin-1", "replace")).digest()
        if key in self._verified:
            return True
        if not check_password(password, stored):
            return False
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = None
        return True


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from ``Authorization: Basic ...`` (nginx's ngx_http_auth_basic_user)."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def parse_htpasswd(text: str) -> dict[str, str]:
    """``user:hash`` lines; ``#`` comments and blank lines skipped; the first entry wins."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if sep and user not in users:
            users[user] = stored.split(":", 1)[0].strip()
    return users


def check_password(password: str, stored: str) -> bool:
    """Does ``password`` match ``stored`` (one htpasswd hash)? Constant-time comparisons."""
    raw = password.encode("latin-1", "replace")
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        import bcrypt

        try:
            return bcrypt.checkpw(raw, stored.replace("$2y$", "$2b$", 1).encode("ascii"))
        except ValueError:
            return False
    if stored.startswith("{PLAIN}"):
        return hmac.compare_digest(raw, stored[7:].encode("latin-1", "replace"))
    if stored.startswith("{SHA}"):
        expected = base64.b64encode(hashlib.sha1(raw).digest()).decode("ascii")
        return hmac.compare_digest(expected, stored[5:])
    if stored.startswith("{SSHA}"):
        try:
            blob = base64.b64decode(stored[6:])
        except (binascii.Error, ValueError):
            return False
        digest, salt = blob[:20], blob[20:]
        return hmac.compare_digest(hashlib.sha1(raw + salt).digest(), digest)
    for magic in ("$apr1$", "$1$"):
        if stored.startswith(magic):
            salt_text = stored[len(magic):].split("$", 1)[0]
            return hmac.compare_digest(md5_crypt(raw, salt_text.encode("ascii", "replace"), magic), stored)
    return False


_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def md5_crypt(password: bytes, salt: bytes, magic: str = "$apr1$") -> str:
    """MD5-crypt (Poul-Henning Kamp's; Apache's ``$apr1$`` differs only in the magic)."""
    salt = salt[:8]
    magic_bytes = magic.encode("ascii")
    ctx = hashlib.md5(password + magic_bytes + salt)
    final = hashlib.md5(password + salt + password).digest()
    for i in range(len(password), 0, -16):
        ctx.update(final[: min(16, i)])
    i = len(password)
    while i:
        ctx.update(b"\0" if i & 1 else password[:1])
        i >>= 1
    final = ctx.digest()
    for i in range(1000):
        step = hashlib.md5()
        step.update(password if i & 1 else final)
        if i % 3:
            step.update(salt)
        if i % 7:
            step.update(password)
        step.update(final if i & 1 else password)
        final = step.digest()
    out = []
    for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        value = final[a] << 16 | final[b] << 8 | final[c]
        out.append(_to64(value, 4))
    out.append(_to64(final[11], 2))
    return f"{magic}{salt.decode('ascii', 'replace')}${''.join(out)}"


def _to64(value: int, count: int) -> str:
    chars = []
    for _ in range(count):
        chars.append(_ITOA64[value & 0x3F])
        value >>= 6
    return "".join(chars)

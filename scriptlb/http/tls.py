"""TLS contexts from frozen config, and the ``$ssl_*`` variables.

``server_context(conf)`` builds the ``ssl.SSLContext`` of one server's ``SslConf`` (termination);
the config loader calls it once to turn a bad certificate, key or setting into a config error
with nginx's words and the directive's file:line (``TlsConfigError``), and each worker calls it
again (contexts are not shared across processes). ``sni_context`` makes the one context a
listening socket is opened with: its SNI callback switches the handshake to the context of the
server ``server_name`` picks (exact, wildcard, regex, else the default server), as nginx's
``ngx_http_ssl_servername`` does.

What Python's ssl module cannot do is refused at load time rather than ignored (see the
directive reference): ``ssl_session_ticket_key``, ``ssl_verify_client optional_no_ca``.
``ssl_session_cache``/``ssl_session_timeout``/``ssl_verify_depth`` are accepted; OpenSSL's
built-in per-process cache and tickets serve resumption within a worker.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import ProxySslConf, Source, SslCertificate, SslConf

ALPN = ["http/1.1"]

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class TlsConfigError(Exception):
    """A TLS setting OpenSSL refused; ``str()`` is nginx's text, ``source`` its directive."""

    def __init__(self, message: str, source: Source | None) -> None:
        super().__init__(message)
        self.source = source


def server_context(conf: SslConf) -> ssl.SSLContext:
    """The SSLContext terminating TLS for one server (raises TlsConfigError)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _set_protocols(ctx, conf)
    try:
        ctx.set_ciphers(conf.ciphers)
    except ssl.SSLError as e:
        raise TlsConfigError(f'SSL_CTX_set_cipher_list("{conf.ciphers}") failed ({_reason(e)})', conf.source)
    if conf.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not conf.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    _set_curve(ctx, conf)
    if conf.dhparam is not None:
        try:
            ctx.load_dh_params(conf.dhparam)
        except (OSError, ssl.SSLError) as e:
            message = f'PEM_read_bio_DHparams("{conf.dhparam}") failed ({_reason(e)})'
            raise TlsConfigError(message, conf.source)
    password = _password(conf)
    for pair in conf.certificates:
        _load_pair(ctx, pair, password)
    _set_client_verification(ctx, conf)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _set_protocols(ctx: ssl.SSLContext, conf: SslConf) -> None:
    versions = sorted(_VERSIONS[p] for p in conf.protocols if p in _VERSIONS)
    if not versions:  # (only SSLv2/SSLv3: OpenSSL 3 has neither)
        raise TlsConfigError("no TLS protocol enabled in ssl_protocols", conf.source)
    ctx.minimum_version = versions[0]
    ctx.maximum_version = versions[-1]


def _set_curve(ctx: ssl.SSLContext, conf: SslConf) -> None:
    curve = conf.ecdh_curve
    if curve == "auto":
        return
    # Python sets one curve; of a list ("X25519:prime256v1") the first is the preferred one
    first = curve.split(":")[0]
    try:
        ctx.set_ecdh_curve(first)
    except (ValueError, ssl.SSLError) as e:
        raise TlsConfigError(f'SSL_CTX_set1_curves_list("{curve}") failed ({_reason(e)})', conf.source)


def _password(conf: SslConf) -> Callable[[], str] | None:
    """ssl_password_file: nginx tries each line in turn; OpenSSL asks once per key, so the
    lines are tried by loading the key again with the next one (see _load_pair)."""
    if conf.password_file is None:
        return None
    try:
        with open(conf.password_file, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f if line.rstrip("\r\n")]
    except OSError as e:
        raise TlsConfigError(f'open() "{conf.password_file}" failed ({e.errno}: {e.strerror})', conf.source)
    return _PasswordLines(lines)


class _PasswordLines:
    __slots__ = ("index", "lines")

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.index = 0

    def __call__(self) -> str:
        return self.lines[self.index] if self.index < len(self.lines) else ""


def _load_pair(ctx: ssl.SSLContext, pair: SslCertificate, password: Any) -> None:
    for path in (pair.certificate, pair.key):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            what = "certificate" if path == pair.certificate else "certificate key"
            raise TlsConfigError(f'cannot load {what} "{path}": BIO_new_file() failed '
                                 f"({e.errno}: {e.strerror})", pair.source)
    attempts = len(password.lines) if password is not None and password.lines else 1
    for attempt in range(attempts):
        if password is not None:
            password.index = attempt
        try:
            ctx.load_cert_chain(pair.certificate, pair.key, password)
            return
        except ssl.SSLError as e:
            if attempt + 1 < attempts and "bad decrypt" in str(e).lower():
                continue
            raise TlsConfigError(f'SSL_CTX_use_PrivateKey("{pair.key}") failed ({_reason(e)})', pair.source)


def _set_client_verification(ctx: ssl.SSLContext, conf: SslConf) -> None:
    if conf.verify_client == "off":
        return
    if conf.client_certificate is None:
        raise TlsConfigError('no ssl_client_certificate for ssl_verify_client', conf.source)
    try:
        ctx.load_verify_locations(conf.client_certificate)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f'SSL_CTX_load_verify_locations("{conf.client_certificate}") failed '
                             f"({_reason(e)})", conf.source)
    ctx.verify_mode = ssl.CERT_REQUIRED if conf.verify_client == "on" else ssl.CERT_OPTIONAL


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return f"SSL: {e.reason or e}"
    if isinstance(e, OSError) and e.errno:
        return f"{e.errno}: {e.strerror}"
    return str(e)


# --------------------------------------------------------------------------- SNI


def sni_context(default: ssl.SSLContext, pick: Callable[[str | None], ssl.SSLContext]) -> ssl.SSLContext:
    """``default`` (the default server's context) with an SNI callback switching to the
    context of the server named by the client (``pick(name)``; None: no SNI)."""

    def on_server_name(sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.sni_name = name  # for $ssl_server_name (an SSLObject takes attributes)
        chosen = pick(name.lower() if name else None)
        if chosen is not default:
            sock.context = chosen

    default.sni_callback = on_server_name
    return default


# --------------------------------------------------------------------------- variables

_DN_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress",
    "domainComponent": "DC",
}


def _tls(ex: Any) -> Any:
    return ex.conn.tls


def _protocol(ex: Any) -> str | None:
    tls = _tls(ex)
    return tls.version() if tls is not None else None


def _cipher(ex: Any) -> str | None:
    tls = _tls(ex)
    return tls.cipher()[0] if tls is not None else None


def _server_name(ex: Any) -> str | None:
    tls = _tls(ex)
    return getattr(tls, "sni_name", None) if tls is not None else None


def _session_reused(ex: Any) -> str | None:
    tls = _tls(ex)
    return ("r" if tls.session_reused else ".") if tls is not None else None


def _client_verify(ex: Any) -> str | None:
    tls = _tls(ex)
    if tls is None:
        return None
    # (a certificate that failed verification ends the handshake: one that is here passed)
    return "SUCCESS" if tls.getpeercert() else "NONE"


def _client_s_dn(ex: Any) -> str | None:
    """RFC 2253 order, as nginx's $ssl_client_s_dn: the last RDN first, "," between."""
    tls = _tls(ex)
    cert = tls.getpeercert() if tls is not None else None
    if not cert:
        return None
    parts = [f"{_DN_NAMES.get(k, k)}={v}" for rdn in reversed(cert.get("subject", ())) for k, v in rdn]
    return ",".join(parts)


def _https(ex: Any) -> str | None:
    return "on" if _tls(ex) is not None else ""


TLS_VARIABLES: dict[str, Callable[[Any], str | None]] = {
    "ssl_protocol": _protocol,
    "ssl_cipher": _cipher,
    "ssl_server_name": _server_name,
    "ssl_session_reused": _session_reused,
    "ssl_client_verify": _client_verify,
    "ssl_client_s_dn": _client_s_dn,
    "https": _https,
}


# --------------------------------------------------------------------------- to the peers


def client_context(conf: ProxySslConf) -> ssl.SSLContext:
    """The SSLContext for TLS to the peers of one location (raises TlsConfigError).

    Python checks the name as part of the handshake when a server_hostname is given: with
    ``proxy_ssl_verify on`` the name is therefore always sent as SNI too (nginx can verify a
    name it does not send; a peer seldom minds being told it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    versions = sorted(_VERSIONS[p] for p in conf.protocols if p in _VERSIONS)
    if not versions:
        raise TlsConfigError("no TLS protocol enabled in proxy_ssl_protocols", None)
    ctx.minimum_version, ctx.maximum_version = versions[0], versions[-1]
    try:
        ctx.set_ciphers(conf.ciphers)
    except ssl.SSLError as e:
        raise TlsConfigError(f'SSL_CTX_set_cipher_list("{conf.ciphers}") failed ({_reason(e)})', None)
    if conf.verify:
        if conf.trusted_certificate is None:
            raise TlsConfigError("no proxy_ssl_trusted_certificate for proxy_ssl_verify", None)
        try:
            ctx.load_verify_locations(conf.trusted_certificate)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f'SSL_CTX_load_verify_locations("{conf.trusted_certificate}") failed '
                                 f"({_reason(e)})", None)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if conf.certificate is not None and conf.certificate_key is not None:
        pair = SslCertificate(conf.certificate, conf.certificate_key)
        password = _password(SslConf(password_file=conf.password_file))
        _load_pair(ctx, pair, password)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def handshake_error_text(exc: ssl.SSLError) -> str:
    """nginx's error-log text for a failed handshake with a peer (without "while ...")."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"upstream SSL certificate verify error: ({exc.verify_code}:{exc.verify_message})"
    return f"SSL_do_handshake() failed ({_reason(exc)})"


class PeerTls:
    """A location's TLS to its peers: the context, the name (``proxy_ssl_name``, rendered per
    request) and whether it is sent as SNI (``proxy_ssl_server_name``)."""

    __slots__ = ("context", "name", "sni")

    def __init__(self, context: ssl.SSLContext, name: Callable[[Any], str], sni: bool) -> None:
        self.context = context
        self.name = name
        self.sni = sni

    def server_hostname(self, name: str) -> str | None:
        """What to give the handshake: the name when it is sent or verified, else None."""
        return name if (self.sni or self.context.check_hostname) and name else None


def proxy_host_name(proxy_host: str) -> str:
    """proxy_ssl_name's default: the host of the proxy_pass URL (no port, no brackets)."""
    if proxy_host.startswith("["):
        return proxy_host[1:proxy_host.index("]")]
    return proxy_host.rsplit(":", 1)[0] if proxy_host.count(":") == 1 else proxy_host

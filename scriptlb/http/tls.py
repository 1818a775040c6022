"""TLS contexts from frozen config, and the ``$ssl_*`` variables.

``server_context(conf)`` builds the ``ssl.SSLContext`` of one server's ``SslConf`` (termination);
the config loader calls it once to turn a bad certificate, key or setting into a config error
with nginx's words and the directive's file:line (``TlsConfigError``), and each worker calls it
again (contexts are not shared across processes). ``sni_context`` makes the one context a
listening socket is opened with: its SNI callback switches the handshake to the context of the
server ``server_name`` picks (exact, wildcard, regex, else the default server), as nginx's
``ngx_http_ssl_servername`` does.

What Python's ssl module lacks comes from ``scriptlb.http.tls_native`` (ctypes on the same libssl):
nginx's ``ssl_verify_client`` (the handshake finishes, the request gets a 495/496 page, see
``client_refusal``), ``optional_no_ca``, ``ssl_verify_depth``, ``ssl_session_timeout`` and
``ssl_session_ticket_key``.
Session tickets are encrypted with one key per configuration shared by every worker (the
file's, else a random one made in the master before the workers fork), so a session made on one
worker resumes on any other: that is what ``ssl_session_cache shared:`` is for in nginx. With
``ssl_session_tickets off`` a ``shared:`` zone keeps session IDs for every worker
(``scriptlb.http.tls_sessions``); with tickets on, IDs stay in OpenSSL's per-worker cache.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

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


# session tickets' key when no ssl_session_ticket_key is set: made once in the master (the config
# is loaded there first), inherited by every worker it forks
_RANDOM_TICKET_KEYS = os.urandom(80)

# verification errors ssl_verify_client optional_no_ca lets through (nginx's
# ngx_ssl_verify_error_optional: an issuer that is unknown or untrusted, a self-signed one)
_OPTIONAL_NO_CA_ERRORS = frozenset({18, 19, 20, 21, 27})


def server_context(conf: SslConf, sessions_directory: str | None = None) -> ssl.SSLContext:
    """The SSLContext terminating TLS for one server, http's or stream's (raises
    TlsConfigError). A client certificate is asked for and checked after the handshake
    (``client_refusal``), as nginx does. ``sessions_directory``: where a worker finds the
    ``ssl_session_cache shared:`` zones (None at load time: no zone is opened)."""
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
    else:
        _set_ticket_keys(ctx, conf)
    from scriptlb.http import tls_native

    tls_native.set_session_timeout(ctx, max(1, int(conf.session_timeout)))
    tls_native.set_session_cache(ctx, *session_cache_mode(conf.session_cache))
    if sessions_directory is not None and not conf.session_tickets:
        _share_sessions(ctx, conf, sessions_directory)
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


SESSIONS_PER_MEGABYTE = 4000  # nginx: "one megabyte of the cache can store about 4000 sessions"


def session_cache_mode(text: str) -> tuple[int, int | None]:
    """(OpenSSL cache mode, sessions kept or None for OpenSSL's default) of ssl_session_cache,
    as nginx's ngx_ssl_session_cache: ``off`` says sessions are not reusable, ``none`` (the
    default) says they are but keeps none, ``builtin[:N]`` keeps N per worker; a ``shared:``
    zone is a per-worker cache of the zone's size here unless tickets are off (then the zone
    itself is used, see _share_sessions)."""
    from scriptlb.config.units import parse_size
    from scriptlb.http.tls_native import (
        SSL_SESS_CACHE_NO_AUTO_CLEAR,
        SSL_SESS_CACHE_NO_INTERNAL_STORE,
        SSL_SESS_CACHE_OFF,
        SSL_SESS_CACHE_SERVER,
    )

    words = text.split()
    if "off" in words:
        return SSL_SESS_CACHE_OFF, None
    size: int | None = None
    cached = False
    for word in words:
        if word.startswith("builtin"):
            cached = True
            size = int(word.partition(":")[2]) if ":" in word else size
        elif word.startswith("shared:"):
            cached = True
            megabytes = (parse_size(word.rsplit(":", 1)[1]) or 0) / (1024 * 1024)
            size = size or max(1, int(megabytes * SESSIONS_PER_MEGABYTE))
    if not cached:  # none
        return SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_AUTO_CLEAR | SSL_SESS_CACHE_NO_INTERNAL_STORE, 1
    return SSL_SESS_CACHE_SERVER, size


def _share_sessions(ctx: ssl.SSLContext, conf: SslConf, directory: str) -> None:
    """Session IDs in the ``shared:`` zone, for every worker (see scriptlb.http.tls_sessions)."""
    from scriptlb.http import tls_native
    from scriptlb.http.tls_sessions import shared_sessions, shared_zone

    zone = shared_zone(conf.session_cache)
    if zone is not None and tls_native.available():
        tls_native.share_sessions(ctx, shared_sessions(directory, *zone))


def ticket_keys(data: bytes) -> bytes:
    """OpenSSL's 80 ticket-key bytes (name, HMAC key, AES key) from an ssl_session_ticket_key
    file: an 80-byte file is in that layout already (as nginx reads it); a 48-byte one (name,
    AES-128 key, HMAC key for nginx) has its two 16-byte keys stretched to OpenSSL's 32 with
    SHA-256 (OpenSSL's built-in tickets use AES-256: same file, same keys in every worker)."""
    if len(data) == 80:
        return data
    name, aes, hmac = data[:16], data[16:32], data[32:48]
    return name + hashlib.sha256(b"hmac" + hmac).digest() + hashlib.sha256(b"aes" + aes).digest()


def _set_ticket_keys(ctx: ssl.SSLContext, conf: SslConf) -> None:
    from scriptlb.http import tls_native

    if not conf.session_ticket_keys:
        if tls_native.available():
            tls_native.set_ticket_keys(ctx, _RANDOM_TICKET_KEYS)
        return
    if not tls_native.available():
        raise TlsConfigError('"ssl_session_ticket_key" is not supported by scriptlb on this Python '
                             "(its libssl could not be reached)", conf.source)
    keys = []
    for path, source in conf.session_ticket_keys:  # the first encrypts, all decrypt
        try:
            with open(path, "rb") as f:
                data = f.read(81)
        except OSError as e:
            raise TlsConfigError(f'open() "{path}" failed ({e.errno}: {e.strerror})', source)
        if len(data) not in (48, 80):
            raise TlsConfigError(f'"{path}" must be 48 or 80 bytes', source)
        keys.append(ticket_keys(data))
    if len(keys) == 1:  # (OpenSSL's own tickets: no Python call per ticket)
        tls_native.set_ticket_keys(ctx, keys[0])
    else:
        tls_native.set_ticket_key_list(ctx, keys)


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
    from scriptlb.http import tls_native

    if tls_native.available():  # the whole list, in its order, as nginx sets it
        if not tls_native.set_groups_list(ctx, curve):
            raise TlsConfigError(f'SSL_CTX_set1_curves_list("{curve}") failed', conf.source)
        return
    # (Python alone sets one curve: of a list, the first, the preferred one)
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
    ctx.scriptlb_verify_client = conf.verify_client  # type: ignore[attr-defined]  # (client_refusal)
    if conf.verify_client == "off":
        return
    # (optional_no_ca asks for any certificate: it needs no CA, as in nginx)
    if conf.client_certificate is None and conf.verify_client != "optional_no_ca":
        raise TlsConfigError('no ssl_client_certificate for ssl_verify_client', conf.source)
    for path in (conf.client_certificate, conf.trusted_certificate):
        if path is None:
            continue
        try:
            ctx.load_verify_locations(path)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f'SSL_CTX_load_verify_locations("{path}") failed '
                                 f"({_reason(e)})", conf.source)
    from scriptlb.http import tls_native

    if conf.client_certificate is not None:  # (ssl_trusted_certificate's names are not sent)
        tls_native.send_client_ca_names(ctx, conf.client_certificate)
    if tls_native.available():
        tls_native.verify_without_failing(ctx, conf.verify_depth)
        return
    if conf.verify_client == "optional_no_ca":
        raise TlsConfigError('"ssl_verify_client optional_no_ca" is not supported by scriptlb on this '
                             "Python (its libssl could not be reached)", conf.source)
    # (without libssl's verify callback: the handshake itself verifies, and fails)
    ctx.scriptlb_verify_client = "off"  # type: ignore[attr-defined]  # (a mark on the context, as above)
    ctx.verify_mode = ssl.CERT_REQUIRED if conf.verify_client == "on" else ssl.CERT_OPTIONAL


def client_refusal(tls: Any) -> tuple[int, str] | None:
    """After a handshake: nginx's answer to every request of a connection whose client
    certificate ssl_verify_client refuses, as (status, error-log text): 495 for a certificate
    that failed verification, 496 for none where one is required; None: served."""
    verify = getattr(tls.context, "scriptlb_verify_client", "off")
    if verify == "off":
        return None
    from scriptlb.http import tls_native

    code = tls_native.verify_result(tls)
    if code and (verify != "optional_no_ca" or code not in _OPTIONAL_NO_CA_ERRORS):
        return 495, f"client SSL certificate verify error: ({code}:{tls_native.verify_error_text(code)})"
    if verify == "on" and tls.getpeercert(True) is None:
        return 496, "client sent no required SSL certificate"
    return None


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
            from scriptlb.http import tls_native

            tls_native.adopt_verification(sock, chosen)

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
    if tls.getpeercert(True) is None:
        return "NONE"
    from scriptlb.http import tls_native

    code = tls_native.verify_result(tls)
    return f"FAILED:{tls_native.verify_error_text(code)}" if code else "SUCCESS"


def _client_cert(ex: Any) -> dict[str, Any] | None:
    """The client certificate's fields as Python decodes them (None: no certificate)."""
    tls = _tls(ex)
    return (tls.getpeercert() or None) if tls is not None else None


def _client_der(ex: Any) -> bytes | None:
    tls = _tls(ex)
    return tls.getpeercert(True) if tls is not None else None


def _dn(name: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """RFC 2253 order, as nginx's $ssl_client_s_dn: the last RDN first, "," between."""
    return ",".join(f"{_DN_NAMES.get(k, k)}={v}" for rdn in reversed(name) for k, v in rdn)


def _client_s_dn(ex: Any) -> str | None:
    cert = _client_cert(ex)
    return _dn(cert.get("subject", ())) if cert else None


def _client_i_dn(ex: Any) -> str | None:
    cert = _client_cert(ex)
    return _dn(cert.get("issuer", ())) if cert else None


def _client_serial(ex: Any) -> str | None:
    cert = _client_cert(ex)
    return cert.get("serialNumber") if cert else None  # (i2a_ASN1_INTEGER's hex, as nginx's)


def _client_v_start(ex: Any) -> str | None:
    cert = _client_cert(ex)
    return cert.get("notBefore") if cert else None  # (ASN1_TIME_print's text, as nginx's)


def _client_v_end(ex: Any) -> str | None:
    cert = _client_cert(ex)
    return cert.get("notAfter") if cert else None


def _client_v_remain(ex: Any) -> str | None:
    """Whole days left; "0" in the last day or past it (nginx's ngx_ssl_get_client_v_remain)."""
    cert = _client_cert(ex)
    if not cert or "notAfter" not in cert:
        return None
    left = ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()
    return str(int(left // 86400)) if left >= 86400 else "0"


def _client_fingerprint(ex: Any) -> str | None:
    der = _client_der(ex)
    return hashlib.sha1(der).hexdigest() if der else None  # (nginx's digest: SHA-1)


def _client_raw_cert(ex: Any) -> str | None:
    der = _client_der(ex)
    return ssl.DER_cert_to_PEM_cert(der) if der else None


def _client_cert_tabbed(ex: Any) -> str | None:
    """$ssl_client_cert (deprecated in nginx, still in configs): the PEM without its last newline,
    every line after the first starting with a tab (to fit in a header, as nginx's)."""
    pem = _client_raw_cert(ex)
    return pem[:-1].replace("\n", "\n\t") if pem else None


def _client_ciphers(ex: Any) -> str | None:
    tls = _tls(ex)
    if tls is None:
        return None
    from scriptlb.http import tls_native

    return tls_native.client_ciphers(tls)


def _client_curves(ex: Any) -> str | None:
    tls = _tls(ex)
    if tls is None:
        return None
    from scriptlb.http import tls_native

    return tls_native.client_curves(tls)


def _client_escaped_cert(ex: Any) -> str | None:
    pem = _client_raw_cert(ex)
    return quote(pem, safe="") if pem else None


def _alpn_protocol(ex: Any) -> str | None:
    tls = _tls(ex)
    return (tls.selected_alpn_protocol() or "") if tls is not None else None


def _session_id(ex: Any) -> str | None:
    tls = _tls(ex)
    session = tls.session if tls is not None else None
    return session.id.hex() if session is not None else None


def _https(ex: Any) -> str | None:
    return "on" if _tls(ex) is not None else ""


TLS_VARIABLES: dict[str, Callable[[Any], str | None]] = {
    "ssl_protocol": _protocol,
    "ssl_cipher": _cipher,
    "ssl_server_name": _server_name,
    "ssl_session_reused": _session_reused,
    "ssl_client_verify": _client_verify,
    "ssl_client_s_dn": _client_s_dn,
    "ssl_client_i_dn": _client_i_dn,
    "ssl_client_serial": _client_serial,
    "ssl_client_fingerprint": _client_fingerprint,
    "ssl_client_v_start": _client_v_start,
    "ssl_client_v_end": _client_v_end,
    "ssl_client_v_remain": _client_v_remain,
    "ssl_client_raw_cert": _client_raw_cert,
    "ssl_client_cert": _client_cert_tabbed,
    "ssl_ciphers": _client_ciphers,
    "ssl_curves": _client_curves,
    "ssl_client_escaped_cert": _client_escaped_cert,
    "ssl_alpn_protocol": _alpn_protocol,
    "ssl_session_id": _session_id,
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
        from scriptlb.http import tls_native

        tls_native.set_verify_depth(ctx, conf.verify_depth)
        _load_crl(ctx, conf.crl)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    certificate, key = conf.certificate, conf.certificate_key
    if isinstance(certificate, str) and isinstance(key, str):  # (with variables: per connection)
        password = _password(SslConf(password_file=conf.password_file))
        _load_pair(ctx, SslCertificate(certificate, key), password)
    ctx.set_alpn_protocols(ALPN)
    if conf.conf_commands:
        from scriptlb.http import tls_native

        refused = tls_native.conf_commands(ctx, conf.conf_commands)
        if refused is not None:
            raise TlsConfigError(refused, None)
    return ctx


def _load_crl(ctx: ssl.SSLContext, path: str | None) -> None:
    """proxy_ssl_crl / ssl_crl: the revocation lists of a file, checked for the whole chain
    (nginx's ngx_ssl_crl: X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL)."""
    if path is None:
        return
    try:
        ctx.load_verify_locations(path)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f'X509_LOOKUP_load_file("{path}") failed ({_reason(e)})', None)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def certificate_pair(conf: ProxySslConf, compile_template: Callable[[Any], Callable[[Any], str]],
                     prefix: str) -> Callable[[Any], tuple[str, str]] | None:
    """proxy_ssl_certificate / _key with variables: what gives a request's or session's
    (certificate, key) paths, relative ones against the prefix as nginx's (None: no variables)."""
    certificate, key = conf.certificate, conf.certificate_key
    if isinstance(certificate, str | None) and isinstance(key, str | None):
        return None

    def getter(value: Any) -> Callable[[Any], str]:
        if isinstance(value, str | None):
            text = value or ""
            return lambda owner: text
        return compile_template(value)

    get_certificate, get_key = getter(certificate), getter(key)

    def pair(owner: Any) -> tuple[str, str]:
        path = get_certificate(owner)
        if not path:
            return "", ""
        return os.path.join(prefix, path), os.path.join(prefix, get_key(owner))

    return pair


_NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def handshake_error_text(exc: ssl.SSLError) -> str:
    """nginx's error-log text for a failed handshake with a peer (without "while ...")."""
    if isinstance(exc, ssl.SSLEOFError):
        return "peer closed connection in SSL handshake"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH:  # (nginx checks the name apart, after the chain)
            name = (exc.verify_message or "").partition("'")[2].rpartition("'")[0]
            return f'upstream SSL certificate does not match "{name}"'
        return f"upstream SSL certificate verify error: ({exc.verify_code}:{exc.verify_message})"
    return f"SSL_do_handshake() failed ({_reason(exc)})"


MAX_PEER_SESSIONS = 1024  # sessions kept per location for proxy_ssl_session_reuse (oldest go)


class PeerTls:
    """A location's TLS to its peers: the context, the name (``proxy_ssl_name``, rendered per
    request), whether it is sent as SNI (``proxy_ssl_server_name``), and with
    ``proxy_ssl_session_reuse`` the last session of each peer (by address and TLS name, as
    nginx keeps one per peer) for the next new connection to resume."""

    __slots__ = ("_contexts", "_pair", "conf", "context", "name", "sessions", "sni")

    def __init__(self, context: ssl.SSLContext, name: Callable[[Any], str], sni: bool,
                 session_reuse: bool = True, conf: ProxySslConf | None = None,
                 pair: Callable[[Any], tuple[str, str]] | None = None) -> None:
        self.context = context
        self.name = name
        self.sni = sni
        self.sessions: dict[tuple[str, str | None], ssl.SSLSession] | None = {} if session_reuse else None
        self.conf = conf
        # proxy_ssl_certificate with variables: (certificate, key) paths of a request or session
        self._pair = pair
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}

    def context_for(self, owner: Any) -> ssl.SSLContext:
        """The context of one connection: with a certificate named by variables, a context
        holding that pair (built once per pair, as nginx loads it per connection; an empty
        certificate value sends none); raises TlsConfigError when the pair does not load."""
        if self._pair is None:
            return self.context
        certificate, key = self._pair(owner)
        if not certificate:
            return self.context
        context = self._contexts.get((certificate, key))
        if context is None:
            assert self.conf is not None
            from dataclasses import replace

            context = client_context(replace(self.conf, certificate=certificate, certificate_key=key))
            if len(self._contexts) >= MAX_PEER_SESSIONS:
                del self._contexts[next(iter(self._contexts))]
            self._contexts[(certificate, key)] = context
        return context

    def session(self, key: tuple[str, str | None],
                context: ssl.SSLContext | None = None) -> ssl.SSLSession | None:
        """The session to resume (a context of its own, for a certificate named by variables,
        resumes none: a session belongs to the context that made it)."""
        if self.sessions is None or (context is not None and context is not self.context):
            return None
        return self.sessions.get(key)

    def keeper(self, key: tuple[str, str | None],
               context: ssl.SSLContext | None = None) -> Callable[[ssl.SSLSession], None] | None:
        """What stores a new connection's session under ``key`` (None: reuse is off)."""
        sessions = self.sessions
        if sessions is None or (context is not None and context is not self.context):
            return None

        def keep(session: ssl.SSLSession) -> None:
            sessions.pop(key, None)
            if len(sessions) >= MAX_PEER_SESSIONS:
                del sessions[next(iter(sessions))]
            sessions[key] = session

        return keep

    def server_hostname(self, name: str) -> str | None:
        """What to give the handshake: the name when it is sent or verified, else None."""
        return name if (self.sni or self.context.check_hostname) and name else None


def name_without_port(name: str) -> str:
    """proxy_ssl_name's value without a port, as nginx's ngx_http_upstream_ssl_name and
    ngx_stream_proxy_ssl_name: ``host:port`` -> ``host``, ``[v6]:port`` -> ``[v6]``."""
    start = name.find("]") if name.startswith("[") else 0
    colon = name.find(":", max(start, 0))
    return name[:colon] if colon >= 0 else name


def proxy_host_name(proxy_host: str) -> str:
    """proxy_ssl_name's default: the host of the proxy_pass URL (no port, no brackets)."""
    if proxy_host.startswith("["):
        return proxy_host[1:proxy_host.index("]")]
    return proxy_host.rsplit(":", 1)[0] if proxy_host.count(":") == 1 else proxy_host

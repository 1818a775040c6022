"""TLS termination on a plain socket: OpenSSL through memory BIOs, driven by the protocol.

``TlsTransport`` is the protocol of an accepted TCP (or unix) socket on a ``listen ... ssl``
port and the transport its HTTP protocol (``ClientConnection``) writes to. It replaces the
event loop's own TLS layer (``create_server(ssl=...)``) for what that layer cannot do (at the
same cost: a read is one ``MemoryBIO.write`` and ``SSLObject.read`` calls until the BIO is
empty, checked so that no ``SSLWantReadError`` is raised per read; a response is one
``SSLObject.write`` and one socket write; OpenSSL does most of the work either way):

- the first bytes are looked at before any TLS: plain HTTP sent to a TLS port is served as HTTP
  and answered with nginx's 400 page ("The plain HTTP request was sent to HTTPS port"), as
  nginx decides on the first byte (0x16: a TLS record; bit 0x80: an SSLv2 hello);
- a failed handshake is logged with nginx's words and level (``SSL_do_handshake() failed (SSL:
  error:...) while SSL handshaking, client: ..., server: ...``) and only closes its socket.

The HTTP protocol gets ``connection_made`` once the handshake is done (so its ``ssl_object``
is there for ``$ssl_*``); the handshake itself is bounded by ``client_header_timeout``, as in
nginx. ``close()`` sends a close_notify and closes without waiting for the client's.
"""

from __future__ import annotations

import _ssl
import asyncio
import errno
import ssl
from collections.abc import Callable
from typing import Any

from scriptlb.http.tls import client_refusal
from scriptlb.http.tls_native import keep_session
from scriptlb.logs import errorlog

Refuse = Callable[[asyncio.Protocol, tuple[int, str]], None]
PLAIN_HTTP = (497, "client sent plain HTTP request to HTTPS port")

_HANDSHAKE = 0
_OPEN = 1
_CLOSED = 2
_PLAIN = 3  # plain HTTP on the TLS port: the HTTP protocol owns the socket now

# decrypted bytes asked of one read: a record carries at most 16 KiB, and _ssl allocates the
# size asked before shrinking the result, so a larger size only costs (256 KiB took 12.6 us
# per small request in a micro-benchmark, 16 KiB 1.8 us)
READ_SIZE = 16384
_TLS_RECORD = 0x16  # first byte of a TLS handshake record
_SSLV2_HELLO = 0x80  # high bit of an SSLv2-framed ClientHello's first byte

# nginx logs these handshake failures at "info" (the client's fault: ngx_ssl_connection_error's
# list, as OpenSSL's reason names; alerts from the client are the 1000+ range), others at "crit"
_INFO_REASONS = frozenset({
    "BAD_CHANGE_CIPHER_SPEC", "NO_SUITABLE_KEY_SHARE", "BAD_ALERT", "BAD_KEY_SHARE", "BAD_EXTENSION",
    "BAD_DIGEST_LENGTH", "MISSING_SIGALGS_EXTENSION", "BAD_PACKET_LENGTH",
    "NO_SUITABLE_SIGNATURE_ALGORITHM", "BAD_KEY_UPDATE", "BLOCK_CIPHER_PAD_IS_WRONG",
    "CCS_RECEIVED_EARLY", "DECODE_ERROR", "DATA_BETWEEN_CCS_AND_FINISHED", "DATA_LENGTH_TOO_LONG",
    "DIGEST_CHECK_FAILED", "ENCRYPTED_LENGTH_TOO_LONG", "ERROR_IN_RECEIVED_CIPHER_LIST",
    "EXCESSIVE_MESSAGE_SIZE", "GOT_A_FIN_BEFORE_A_CCS", "HTTPS_PROXY_REQUEST", "HTTP_REQUEST",
    "LENGTH_MISMATCH", "LENGTH_TOO_SHORT", "NO_RENEGOTIATION", "NO_CIPHERS_PASSED",
    "NO_CIPHERS_SPECIFIED", "BAD_CIPHER", "NO_COMPRESSION_SPECIFIED", "NO_SHARED_CIPHER",
    "PACKET_LENGTH_TOO_LONG", "INVALID_ALERT", "RECORD_LENGTH_MISMATCH", "TOO_MANY_WARNING_ALERTS",
    "CLIENTHELLO_TLSEXT", "PARSE_TLSEXT", "CALLBACK_FAILED", "TLS_RSA_ENCRYPTED_VALUE_LENGTH_IS_WRONG",
    "NO_APPLICATION_PROTOCOL", "UNEXPECTED_MESSAGE", "UNEXPECTED_RECORD", "UNKNOWN_ALERT_TYPE",
    "UNKNOWN_PROTOCOL", "NO_COMMON_SIGNATURE_ALGORITHMS", "INVALID_COMPRESSION_LIST", "MISSING_KEY_SHARE",
    "UNSUPPORTED_PROTOCOL", "NO_SHARED_GROUP", "WRONG_VERSION_NUMBER", "TOO_MUCH_SKIPPED_EARLY_DATA",
    "BAD_LENGTH", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "APPLICATION_DATA_AFTER_CLOSE_NOTIFY",
    "BAD_LEGACY_VERSION", "MIXED_HANDSHAKE_AND_NON_HANDSHAKE_DATA", "RECORD_TOO_SMALL",
    "SSL3_SESSION_ID_TOO_LONG", "BAD_ECPOINT", "RECORD_LAYER_FAILURE", "RENEGOTIATE_EXT_TOO_LONG",
    "RENEGOTIATION_ENCODING_ERR", "RENEGOTIATION_MISMATCH", "UNSAFE_LEGACY_RENEGOTIATION_DISABLED",
    "SCSV_RECEIVED_WHEN_RENEGOTIATING", "INAPPROPRIATE_FALLBACK", "NO_SHARED_SIGNATURE_ALGORITHMS",
    "CERT_CB_ERROR", "VERSION_TOO_LOW", "TOO_MANY_WARN_ALERTS", "BAD_RECORD_TYPE",
})
_SSL_AD_REASON_OFFSET = 1000  # OpenSSL's reason code of a received alert: 1000 + alert number
_LIB_TEXT = {"SSL": "SSL routines", "X509": "x509 certificate routines", "PEM": "PEM routines",
             "EVP": "digital envelope routines", "ASN1": "asn1 encoding routines"}
_CODES = {(lib, name): (lib, reason) for (lib, reason), name in _ssl.err_codes_to_names.items()}
_LIB_CODES = {name: code for code, name in _ssl.lib_codes_to_names.items()}


def openssl_error_text(exc: ssl.SSLError) -> str:
    """OpenSSL's ``error:0A0000C1:SSL routines::no shared cipher`` for an SSLError (what nginx
    prints after "SSL:"), rebuilt from the library and reason names Python keeps."""
    library, reason = exc.library, exc.reason
    if not library or not reason:
        return str(exc)
    lib_code = _LIB_CODES.get(library, 0)
    reason_code = _CODES.get((lib_code, reason), (0, 0))[1]
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = message.split("] ", 1)[-1].rsplit(" (_ssl.c:", 1)[0]
    line = f"error:{(lib_code << 23) | reason_code:08X}:{_LIB_TEXT.get(library, library)}::{text}"
    if library == "SSL" and _SSL_AD_REASON_OFFSET <= reason_code <= _SSL_AD_REASON_OFFSET + 255:
        line += f":SSL alert number {reason_code - _SSL_AD_REASON_OFFSET}"
    return line


def handshake_failure_level(exc: ssl.SSLError) -> str:
    """nginx's level for a client's failed handshake: "info" when the client is at fault."""
    reason = exc.reason or ""
    if reason in _INFO_REASONS or "ALERT" in reason:
        return "info"
    return "crit"


def listen_text(key: tuple[str | None, int, str | None]) -> str:
    """nginx's listening ``addr_text`` (the "server:" of a line logged before any request)."""
    host, port, unix_path = key
    if unix_path is not None or host is None:
        return f"unix:{unix_path}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TlsTransport(asyncio.Protocol, asyncio.Transport):
    """One TLS connection: the socket's protocol below, the HTTP protocol's transport above."""

    __slots__ = (
        "_app",
        "_connected",
        "_first",
        "_incoming",
        "_loop",
        "_outgoing",
        "_paused",
        "_raw",
        "_refuse",
        "_server_text",
        "_ssl",
        "_sslobj",
        "_state",
        "_timeout",
        "_timer",
    )

    def __init__(self, context: ssl.SSLContext, app: asyncio.Protocol, loop: asyncio.AbstractEventLoop,
                 handshake_timeout: float, server_text: str, refuse: Refuse | None = None,
                 sslobj: ssl.SSLObject | None = None) -> None:
        self._app = app
        self._loop = loop
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if sslobj is None:
            sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._sslobj = sslobj
        # read/write/pending straight on _ssl's object: SSLObject's methods only forward to it
        # (one Python frame less per call on every request)
        self._ssl = getattr(self._sslobj, "_sslobj", self._sslobj)
        self._raw: Any = None
        self._state = _HANDSHAKE
        self._paused = False  # the HTTP protocol paused reading
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = handshake_timeout
        self._server_text = server_text
        # tells the HTTP protocol to answer every request with an error status (plain HTTP,
        # a client certificate ssl_verify_client refuses); None: such connections are closed
        self._refuse = refuse
        self._first = True  # the connection's first bytes are yet to come
        self._connected = False  # the HTTP protocol got connection_made (so it gets connection_lost)

    # ------------------------------------------------------------------ below: the socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._timer = self._loop.call_later(self._timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._state == _OPEN:
            self._incoming.write(data)
            if not self._paused:
                self._decrypt()
        elif self._state == _HANDSHAKE:
            self._handshake_data(data)

    def eof_received(self) -> bool | None:
        if self._state == _HANDSHAKE:
            self._handshake_failed("info", "peer closed connection in SSL handshake")
            return None
        if self._state == _OPEN:
            if self._app.eof_received():
                return True  # (a stream session relays the half-close)
            self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _OPEN:  # (reset by the client)
            keep_session(self._sslobj)
        self._state = _CLOSED
        self._cancel_timer()
        if self._connected:  # (the HTTP protocol never saw a handshake that did not end)
            self._connected = False
            self._app.connection_lost(exc)
        self._raw = None

    def _connect_app(self) -> None:
        self._connected = True
        self._app.connection_made(self)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # ------------------------------------------------------------------ the handshake

    def _handshake_data(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[0] != _TLS_RECORD and not data[0] & _SSLV2_HELLO and self._refuse is not None:
                self._serve_plain(data)
                return
        self._incoming.write(data)
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert telling the client why
            text = f"SSL_do_handshake() failed (SSL: {openssl_error_text(exc)})"
            self._handshake_failed(handshake_failure_level(exc), text)
            return
        self._flush()  # the server's last flight (and TLSv1.3 session tickets)
        self._cancel_timer()
        self._state = _OPEN
        refusal = client_refusal(self._sslobj)
        if refusal is not None:
            if self._refuse is None:  # (stream: nginx logs why and closes)
                conn_id = getattr(self._app, "conn_id", None)
                errorlog.log_error("info", refusal[1], conn_id, self._log_context("SSL handshaking"))
                self.close()
                return
            self._refuse(self._app, refusal)
        self._connect_app()
        if self._state == _OPEN and self._incoming.pending and not self._paused:
            self._decrypt()  # a request sent with the client's last flight

    def _serve_plain(self, data: bytes) -> None:
        """Plain HTTP on a TLS port: the HTTP protocol takes the socket (and answers 497)."""
        assert self._refuse is not None
        self._cancel_timer()
        self._state = _PLAIN
        self._refuse(self._app, PLAIN_HTTP)
        raw = self._raw
        raw.set_protocol(self._app)
        self._app.connection_made(raw)
        if not raw.is_closing():
            self._app.data_received(data)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            text = f"client timed out ({errno.ETIMEDOUT}: Connection timed out)"
            self._handshake_failed("info", text)

    def _handshake_failed(self, level: str, text: str) -> None:
        conn_id = getattr(self._app, "conn_id", None)
        errorlog.log_error(level, text, conn_id, self._log_context("SSL handshaking"))
        self._cancel_timer()
        self._state = _CLOSED
        if self._raw is not None:
            self._raw.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ reading

    def _decrypt(self) -> None:
        """Hand the HTTP protocol what the incoming BIO holds, decrypted, in one call."""
        sslobj = self._ssl
        incoming = self._incoming
        chunks: list[bytes] = []
        while True:
            try:
                chunk = sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            except ssl.SSLError as exc:
                self._deliver(chunks)
                self._read_failed(exc)
                return
            if not chunk:  # the client's close_notify
                self._deliver(chunks)
                self.eof_received()
                return
            chunks.append(chunk)
            if not incoming.pending and not sslobj.pending():
                break
        if self._outgoing.pending:
            self._flush()  # (what reading produced: a key update's answer)
        self._deliver(chunks)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self._state == _OPEN:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _read_failed(self, exc: ssl.SSLError) -> None:
        text = f"SSL_read() failed (SSL: {openssl_error_text(exc)})"
        errorlog.log_error(handshake_failure_level(exc), text, getattr(self._app, "conn_id", None),
                           self._log_context("waiting for request"))
        self.abort()

    def _log_context(self, action: str) -> str:
        """nginx's suffix of a line logged before any request: `` while ACTION, client: ..., server:
        LISTEN`` (the listening address, as nginx's ngx_http_log_error without a request)."""
        peer = self._raw.get_extra_info("peername") if self._raw is not None else None
        client = peer[0] if isinstance(peer, tuple) else "unix:"
        return f" while {action}, client: {client}, server: {self._server_text}"

    # ------------------------------------------------------------------ above: the transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return
        sslobj = self._ssl
        written = sslobj.write(data)
        if written < len(data):  # (a memory BIO takes everything; kept for safety)
            view = memoryview(data)
            while written < len(view):
                written += sslobj.write(view[written:])
        self._raw.write(self._outgoing.read())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self._state != _OPEN:
            if self._state == _HANDSHAKE and self._raw is not None:
                self._state = _CLOSED
                self._raw.close()
            return
        self._state = _CLOSED
        try:
            self._sslobj.unwrap()  # queues our close_notify; the client's is not waited for
        except (ssl.SSLError, ValueError):
            pass
        self._flush()
        self._raw.close()

    def abort(self) -> None:
        if self._state == _OPEN:
            keep_session(self._sslobj)
        if self._state != _CLOSED and self._state != _PLAIN:
            self._state = _CLOSED
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._state != _OPEN or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._raw is not None and not self._raw.is_closing():
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._raw is not None and not self._raw.is_closing():
                self._raw.resume_reading()
            if self._incoming.pending or self._ssl.pending():
                self._loop.call_soon(self._resume_decrypt)

    def _resume_decrypt(self) -> None:
        if self._state == _OPEN and not self._paused:
            self._decrypt()

    def is_reading(self) -> bool:
        return not self._paused

    def can_write_eof(self) -> bool:
        return False  # (a TLS connection is not half-closed: close_notify ends both ways)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot write EOF")

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._sslobj.context
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._raw is not None and not self._raw.is_closing():
            self._raw.write(data)


class TlsClientTransport(TlsTransport):
    """TLS to a peer (``proxy_pass https://``): the same transport, the client's side of the
    handshake, and the session it may resume (``proxy_ssl_session_reuse``). ``handshake`` is
    done when the peer protocol has its ``connection_made``, or holds why it failed."""

    __slots__ = ("_on_session", "handshake")

    def __init__(self, context: ssl.SSLContext, app: asyncio.Protocol, loop: asyncio.AbstractEventLoop,
                 server_hostname: str | None, session: ssl.SSLSession | None,
                 on_session: Callable[[ssl.SSLSession], None] | None) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=session)
        super().__init__(context, app, loop, 0.0, "", None, sslobj)
        self._incoming, self._outgoing = incoming, outgoing
        self._on_session = on_session  # told of the session once the peer gave it (a ticket)
        self.handshake: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._handshake_step()  # the ClientHello

    def _handshake_data(self, data: bytes) -> None:
        self._incoming.write(data)
        self._handshake_step()

    def _handshake_step(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()
            self._fail(exc)
            return
        self._flush()
        self._state = _OPEN
        self._save_session()  # (TLSv1.2: now; TLSv1.3: its ticket comes with the first answer)
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._connect_app()
        if self._state == _OPEN and self._incoming.pending and not self._paused:
            self._decrypt()

    def _handshake_failed(self, level: str, text: str) -> None:
        self._fail(ssl.SSLEOFError(8, "peer closed connection in SSL handshake"))

    def _fail(self, exc: BaseException) -> None:
        self._state = _CLOSED
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self._raw is not None:
            self._raw.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _HANDSHAKE:
            self._fail(exc or ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
        super().connection_lost(exc)

    def _decrypt(self) -> None:
        super()._decrypt()
        if self._on_session is not None:
            self._save_session()

    def _save_session(self) -> None:
        on_session = self._on_session
        session = self._sslobj.session
        if on_session is not None and session is not None and (
                session.has_ticket or self._sslobj.version() != "TLSv1.3"):
            self._on_session = None  # (once per connection)
            on_session(session)


async def open_tls_connection(loop: asyncio.AbstractEventLoop, app: asyncio.Protocol, host: str | None,
                              port: int, unix_path: str | None, local_addr: tuple[str, int] | None,
                              context: ssl.SSLContext, server_hostname: str | None,
                              session: ssl.SSLSession | None,
                              on_session: Callable[[ssl.SSLSession], None] | None) -> None:
    """Connect, then handshake (both under the caller's connect timeout, as nginx's
    proxy_connect_timeout); ``app`` gets ``connection_made`` once TLS is up. Raises the
    handshake's SSLError or the connect's OSError."""
    transport = TlsClientTransport(context, app, loop, server_hostname, session, on_session)
    try:
        if unix_path is not None:
            await loop.create_unix_connection(lambda: transport, unix_path)
        else:
            assert host is not None
            await loop.create_connection(lambda: transport, host, port, local_addr=local_addr)
        await transport.handshake
    except BaseException:
        transport.abort()
        raise


def tls_protocol_factory(make_app: Callable[[], asyncio.Protocol], context: ssl.SSLContext,
                         loop: asyncio.AbstractEventLoop, handshake_timeout: float, server_text: str,
                         refuse: Refuse | None) -> Callable[[], TlsTransport]:
    """The protocol factory of a ``listen ... ssl`` socket."""

    def factory() -> TlsTransport:
        return TlsTransport(context, make_app(), loop, handshake_timeout, server_text, refuse)

    return factory

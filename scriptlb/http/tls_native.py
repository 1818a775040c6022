"""The few OpenSSL calls Python's ``ssl`` module does not offer, made through ctypes on the very
libssl its ``_ssl`` extension uses (found in this process's memory map).

nginx behaviours that need them:

- ``ssl_verify_client``: nginx asks for a certificate, lets the handshake finish whatever the
  verification says (its verify callback returns 1) and answers the request with a 400 page
  (495 "The SSL certificate error", 496 "No required SSL certificate was sent");
  ``optional_no_ca`` lets some errors pass. Python's ssl fails the handshake instead, so the
  context gets an accept-all verify callback here and the result is read afterwards
  (``SSL_get_verify_result``), with ``ssl_verify_depth`` applied by OpenSSL.
- ``ssl_client_certificate``: its CA names sent in the certificate request
  (``SSL_CTX_set_client_CA_list``).
- ``ssl_ecdh_curve``: a list of curves (Python sets one).
- ``ssl_session_cache``: the cache mode and size (``off``, ``none``, ``builtin:N``).
- ``ssl_session_timeout``: a session's lifetime (``SSL_CTX_set_timeout``).
- ``ssl_session_ticket_key``: the ticket keys (``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``), so that
  every worker (and every node sharing the file) can resume the others' sessions.
- SNI: switching a connection to another server's context must also switch the verification
  settings (OpenSSL keeps the first context's on the connection; nginx copies them too).

The pointers are read from CPython's objects (``PySSLContext.ctx`` and ``PySSLSocket.ssl``,
right after the object header); ``available()`` checks the layout against OpenSSL's own view
once (a context's options, a connection's context) and is False when anything differs, in
which case the directives that need this are refused at load time.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from typing import Any

SSL_VERIFY_PEER = 0x01
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_SESS_CACHE_OFF = 0x0
SSL_SESS_CACHE_SERVER = 0x2
SSL_SESS_CACHE_NO_AUTO_CLEAR = 0x80
SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
TICKET_KEYS_SIZE = 80  # OpenSSL's layout: name (16), HMAC key (32), AES key (32)

_HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD
_SOCKET_SSL_OFFSET = _HEAD + ctypes.sizeof(ctypes.c_void_p)  # PySSLSocket: head, Socket, ssl

_VERIFY_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_all(ok: int, store: int | None) -> int:
    return 1  # the result stays recorded in the connection (SSL_get_verify_result)


_ACCEPT_ALL = _VERIFY_CALLBACK_TYPE(_accept_all)  # (kept alive as long as the module)


class _Lib:
    """libssl's functions, typed."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self.ctx_set_verify = lib.SSL_CTX_set_verify
        self.ctx_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self.ctx_set_verify.restype = None
        self.ctx_get_verify_mode = lib.SSL_CTX_get_verify_mode
        self.ctx_get_verify_mode.argtypes = [ctypes.c_void_p]
        self.ctx_get_verify_mode.restype = ctypes.c_int
        self.ctx_get_verify_callback = lib.SSL_CTX_get_verify_callback
        self.ctx_get_verify_callback.argtypes = [ctypes.c_void_p]
        self.ctx_get_verify_callback.restype = ctypes.c_void_p
        self.ctx_get_verify_depth = lib.SSL_CTX_get_verify_depth
        self.ctx_get_verify_depth.argtypes = [ctypes.c_void_p]
        self.ctx_get_verify_depth.restype = ctypes.c_int
        self.ctx_set_verify_depth = lib.SSL_CTX_set_verify_depth
        self.ctx_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.ctx_set_verify_depth.restype = None
        self.ctx_get_options = lib.SSL_CTX_get_options
        self.ctx_get_options.argtypes = [ctypes.c_void_p]
        self.ctx_get_options.restype = ctypes.c_uint64
        self.load_client_ca_file = lib.SSL_load_client_CA_file
        self.load_client_ca_file.argtypes = [ctypes.c_char_p]
        self.load_client_ca_file.restype = ctypes.c_void_p
        self.ctx_set_client_ca_list = lib.SSL_CTX_set_client_CA_list
        self.ctx_set_client_ca_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.ctx_set_client_ca_list.restype = None
        self.ctx_set_timeout = lib.SSL_CTX_set_timeout
        self.ctx_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
        self.ctx_set_timeout.restype = ctypes.c_long
        self.ctx_ctrl = lib.SSL_CTX_ctrl
        self.ctx_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctx_ctrl.restype = ctypes.c_long
        self.set_verify = lib.SSL_set_verify
        self.set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self.set_verify.restype = None
        self.set_verify_depth = lib.SSL_set_verify_depth
        self.set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.set_verify_depth.restype = None
        self.get_ssl_ctx = lib.SSL_get_SSL_CTX
        self.get_ssl_ctx.argtypes = [ctypes.c_void_p]
        self.get_ssl_ctx.restype = ctypes.c_void_p
        self.get_verify_result = lib.SSL_get_verify_result
        self.get_verify_result.argtypes = [ctypes.c_void_p]
        self.get_verify_result.restype = ctypes.c_long
        self.verify_cert_error_string = lib.X509_verify_cert_error_string  # (libcrypto's, via libssl)
        self.verify_cert_error_string.argtypes = [ctypes.c_long]
        self.verify_cert_error_string.restype = ctypes.c_char_p


def _loaded_libssl() -> str | None:
    """The path of the libssl mapped into this process (the one _ssl is linked with)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if "/libssl.so" in path:
                    return path
    except OSError:
        return None
    return None


_LIB: _Lib | None = None
_CHECKED = False


def _lib() -> _Lib | None:
    global _LIB, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        _LIB = _probe()
    return _LIB


def _probe() -> _Lib | None:
    if sys.implementation.name != "cpython":
        return None
    path = _loaded_libssl()
    if path is None:
        return None
    try:
        lib = _Lib(path)
    except (OSError, AttributeError):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    pointer = _context_pointer(ctx)
    if not pointer or lib.ctx_get_options(pointer) != int(ctx.options):
        return None
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    if lib.get_ssl_ctx(_connection_pointer(obj)) != pointer:
        return None
    return lib


def available() -> bool:
    """True when this process's CPython and libssl are laid out as expected (see the docstring)."""
    return _lib() is not None


def _context_pointer(ctx: ssl.SSLContext) -> int:
    return ctypes.c_void_p.from_address(id(ctx) + _HEAD).value or 0


def _connection_pointer(obj: Any) -> int:
    inner = getattr(obj, "_sslobj", obj)  # SSLObject -> _ssl._SSLSocket
    return ctypes.c_void_p.from_address(id(inner) + _SOCKET_SSL_OFFSET).value or 0


def verify_without_failing(ctx: ssl.SSLContext, depth: int) -> None:
    """Ask clients for a certificate and finish the handshake whatever its verification says
    (nginx's ssl_verify_client); ``depth`` is ssl_verify_depth."""
    lib = _lib()
    assert lib is not None
    pointer = _context_pointer(ctx)
    lib.ctx_set_verify(pointer, SSL_VERIFY_PEER, ctypes.cast(_ACCEPT_ALL, ctypes.c_void_p))
    lib.ctx_set_verify_depth(pointer, depth)


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> None:
    """Encrypt and decrypt session tickets with ``keys`` (TICKET_KEYS_SIZE bytes)."""
    lib = _lib()
    assert lib is not None and len(keys) == TICKET_KEYS_SIZE
    buffer = ctypes.create_string_buffer(keys, TICKET_KEYS_SIZE)
    if lib.ctx_ctrl(_context_pointer(ctx), SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE, buffer) != 1:
        raise ssl.SSLError("SSL_CTX_set_tlsext_ticket_keys() failed")


def send_client_ca_names(ctx: ssl.SSLContext, path: str) -> bool:
    """Name the certificate authorities of ``path`` in the handshake's certificate request, as
    nginx does for ssl_client_certificate (a client picks its certificate by them); False when
    the file holds none OpenSSL can read."""
    lib = _lib()
    if lib is None:
        return False
    names = lib.load_client_ca_file(path.encode())
    if not names:
        return False
    lib.ctx_set_client_ca_list(_context_pointer(ctx), names)  # (the context owns the list now)
    return True


def set_groups_list(ctx: ssl.SSLContext, groups: str) -> bool:
    """ssl_ecdh_curve's list ("X25519:prime256v1"), SSL_CTX_set1_groups_list; False: refused."""
    lib = _lib()
    if lib is None:
        return False
    text = ctypes.create_string_buffer(groups.encode("ascii", "replace"))
    return bool(lib.ctx_ctrl(_context_pointer(ctx), SSL_CTRL_SET_GROUPS_LIST, 0, text) == 1)


def set_session_cache(ctx: ssl.SSLContext, mode: int, size: int | None) -> None:
    """SSL_CTX_set_session_cache_mode (and the number of sessions kept, when given)."""
    lib = _lib()
    if lib is None:
        return
    pointer = _context_pointer(ctx)
    lib.ctx_ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_MODE, mode, None)
    if size is not None:
        lib.ctx_ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)


def set_session_timeout(ctx: ssl.SSLContext, seconds: int) -> None:
    """ssl_session_timeout: how long a session (cached or in a ticket) may be resumed."""
    lib = _lib()
    if lib is not None:
        lib.ctx_set_timeout(_context_pointer(ctx), seconds)


def adopt_verification(obj: Any, ctx: ssl.SSLContext) -> None:
    """After an SNI switch to ``ctx``: its verification settings on the connection, as nginx's
    ngx_http_ssl_servername does (OpenSSL keeps the first context's)."""
    lib = _lib()
    if lib is None:
        return
    pointer = _context_pointer(ctx)
    connection = _connection_pointer(obj)
    lib.set_verify(connection, lib.ctx_get_verify_mode(pointer), lib.ctx_get_verify_callback(pointer))
    lib.set_verify_depth(connection, lib.ctx_get_verify_depth(pointer))


def verify_result(obj: Any) -> int:
    """SSL_get_verify_result of a finished handshake (0: X509_V_OK)."""
    lib = _lib()
    return int(lib.get_verify_result(_connection_pointer(obj))) if lib is not None else 0


def verify_error_text(code: int) -> str:
    """X509_verify_cert_error_string: "certificate has expired", ..."""
    lib = _lib()
    text = lib.verify_cert_error_string(code) if lib is not None else None
    return text.decode("ascii", "replace") if text else f"error {code}"

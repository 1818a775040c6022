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
  every worker (and every node sharing the file) can resume the others' sessions; several files
  (key rotation): a ticket key callback, as nginx's, encrypting with the first key and
  decrypting with any (``SSL_CTX_set_tlsext_ticket_key_cb``).
- ``ssl_session_cache shared:`` with ``ssl_session_tickets off``: the session cache callbacks
  (``SSL_CTX_sess_set_new_cb``/``get_cb``/``remove_cb``), sessions serialised with
  ``i2d_SSL_SESSION`` into a store every worker reads.
- ``$ssl_ciphers`` and ``$ssl_curves``: the client's offered lists
  (``SSL_get0_raw_cipherlist``, ``SSL_get1_curves``).
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
from typing import Any, Protocol

SSL_VERIFY_PEER = 0x01
SSL_SENT_SHUTDOWN = 1
SSL_RECEIVED_SHUTDOWN = 2
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
SSL_CTRL_GET_GROUPS = 90
SSL_CTRL_GET_RAW_CIPHERLIST = 110
TLSEXT_NID_UNKNOWN = 0x1000000
TICKET_KEY_NAME_SIZE = 16
TICKET_IV_SIZE = 16  # AES-CBC's
SSL_SESS_CACHE_OFF = 0x0
SSL_SESS_CACHE_SERVER = 0x2
SSL_SESS_CACHE_NO_AUTO_CLEAR = 0x80
SSL_SESS_CACHE_NO_INTERNAL_LOOKUP = 0x100
SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
SSL_SESS_CACHE_NO_INTERNAL = SSL_SESS_CACHE_NO_INTERNAL_LOOKUP | SSL_SESS_CACHE_NO_INTERNAL_STORE
TICKET_KEYS_SIZE = 80  # OpenSSL's layout: name (16), HMAC key (32), AES key (32)

_HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD
_SOCKET_SSL_OFFSET = _HEAD + ctypes.sizeof(ctypes.c_void_p)  # PySSLSocket: head, Socket, ssl

_VERIFY_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_all(ok: int, store: int | None) -> int:
    return 1  # the result stays recorded in the connection (SSL_get_verify_result)


_ACCEPT_ALL = _VERIFY_CALLBACK_TYPE(_accept_all)  # (kept alive as long as the module)

# int cb(SSL *s, unsigned char key_name[16], unsigned char iv[16], EVP_CIPHER_CTX *cipher,
#        HMAC_CTX *hmac, int enc)
# int new_session_cb(SSL *, SSL_SESSION *); SSL_SESSION *get_session_cb(SSL *, const unsigned char
# *id, int len, int *copy); void remove_session_cb(SSL_CTX *, SSL_SESSION *)
_NEW_SESSION_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_GET_SESSION_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                     ctypes.POINTER(ctypes.c_int))
_REMOVE_SESSION_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
MAX_SESSION_SIZE = 4096  # nginx's NGX_SSL_MAX_SESSION_SIZE: a larger session is not shared

_TICKET_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


def _typed(function: Any, argtypes: list[Any], restype: Any) -> Any:
    """A C function with its argument and return types set (ctypes guesses int otherwise)."""
    function.argtypes = argtypes
    function.restype = restype
    return function


class _Lib:
    """libssl's functions, typed."""

    def __init__(self, path: str, crypto_path: str) -> None:
        lib = ctypes.CDLL(path)
        self._crypto(ctypes.CDLL(crypto_path))
        self.ctx_set_verify = _typed(lib.SSL_CTX_set_verify,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], None)
        self.ctx_get_verify_mode = _typed(lib.SSL_CTX_get_verify_mode, [ctypes.c_void_p], ctypes.c_int)
        self.ctx_get_verify_callback = _typed(lib.SSL_CTX_get_verify_callback,
            [ctypes.c_void_p], ctypes.c_void_p)
        self.ctx_get_verify_depth = _typed(lib.SSL_CTX_get_verify_depth, [ctypes.c_void_p], ctypes.c_int)
        self.ctx_set_verify_depth = _typed(lib.SSL_CTX_set_verify_depth,
            [ctypes.c_void_p, ctypes.c_int], None)
        self.ctx_get_options = _typed(lib.SSL_CTX_get_options, [ctypes.c_void_p], ctypes.c_uint64)
        self.load_client_ca_file = _typed(lib.SSL_load_client_CA_file, [ctypes.c_char_p], ctypes.c_void_p)
        self.ctx_set_client_ca_list = _typed(lib.SSL_CTX_set_client_CA_list,
            [ctypes.c_void_p, ctypes.c_void_p], None)
        self.ctx_set_timeout = _typed(lib.SSL_CTX_set_timeout,
            [ctypes.c_void_p, ctypes.c_long], ctypes.c_long)
        self.ctx_ctrl = _typed(lib.SSL_CTX_ctrl,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p], ctypes.c_long)
        self.set_verify = _typed(lib.SSL_set_verify, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], None)
        self.set_verify_depth = _typed(lib.SSL_set_verify_depth, [ctypes.c_void_p, ctypes.c_int], None)
        self.get_ssl_ctx = _typed(lib.SSL_get_SSL_CTX, [ctypes.c_void_p], ctypes.c_void_p)
        self.set_shutdown = _typed(lib.SSL_set_shutdown, [ctypes.c_void_p, ctypes.c_int], None)
        self.get_verify_result = _typed(lib.SSL_get_verify_result, [ctypes.c_void_p], ctypes.c_long)
        # (libcrypto's, via libssl)
        self.verify_cert_error_string = _typed(lib.X509_verify_cert_error_string,
            [ctypes.c_long], ctypes.c_char_p)
        self.ctx_callback_ctrl = _typed(lib.SSL_CTX_callback_ctrl,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], ctypes.c_long)
        self.ctrl = _typed(lib.SSL_ctrl,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p], ctypes.c_long)
        self.cipher_find = _typed(lib.SSL_CIPHER_find, [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p)
        self.cipher_get_name = _typed(lib.SSL_CIPHER_get_name, [ctypes.c_void_p], ctypes.c_char_p)
        self.group_to_name = _typed(lib.SSL_group_to_name, [ctypes.c_void_p, ctypes.c_int], ctypes.c_char_p)

        self.conf_ctx_new = _typed(lib.SSL_CONF_CTX_new, [], ctypes.c_void_p)
        self.conf_ctx_free = _typed(lib.SSL_CONF_CTX_free, [ctypes.c_void_p], None)
        self.conf_ctx_set_flags = _typed(lib.SSL_CONF_CTX_set_flags,
            [ctypes.c_void_p, ctypes.c_uint], ctypes.c_uint)
        self.conf_ctx_set_ssl_ctx = _typed(lib.SSL_CONF_CTX_set_ssl_ctx,
            [ctypes.c_void_p, ctypes.c_void_p], None)
        self.conf_cmd = _typed(lib.SSL_CONF_cmd,
            [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int)
        self.conf_cmd_value_type = _typed(lib.SSL_CONF_cmd_value_type,
            [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int)
        self.conf_ctx_finish = _typed(lib.SSL_CONF_CTX_finish, [ctypes.c_void_p], ctypes.c_int)

        callback_setter = [ctypes.c_void_p, ctypes.c_void_p]
        self.ctx_sess_set_new_cb = _typed(lib.SSL_CTX_sess_set_new_cb, callback_setter, None)
        self.ctx_sess_set_get_cb = _typed(lib.SSL_CTX_sess_set_get_cb, callback_setter, None)
        self.ctx_sess_set_remove_cb = _typed(lib.SSL_CTX_sess_set_remove_cb, callback_setter, None)
        self.session_get_id = _typed(lib.SSL_SESSION_get_id,
            [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)], ctypes.c_void_p)
        self.session_get_timeout = _typed(lib.SSL_SESSION_get_timeout, [ctypes.c_void_p], ctypes.c_long)
        self.i2d_session = _typed(lib.i2d_SSL_SESSION, [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int)
        self.d2i_session = _typed(lib.d2i_SSL_SESSION,
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long], ctypes.c_void_p)

    def _crypto(self, crypto: ctypes.CDLL) -> None:
        """libcrypto's, for session tickets and curve names."""
        self.rand_bytes = _typed(crypto.RAND_bytes, [ctypes.c_void_p, ctypes.c_int], ctypes.c_int)
        self.aes_256_cbc = _typed(crypto.EVP_aes_256_cbc, [], ctypes.c_void_p)
        self.sha256 = _typed(crypto.EVP_sha256, [], ctypes.c_void_p)
        cipher_init = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.encrypt_init = _typed(crypto.EVP_EncryptInit_ex, cipher_init, ctypes.c_int)
        self.decrypt_init = _typed(crypto.EVP_DecryptInit_ex, cipher_init, ctypes.c_int)
        self.hmac_init = _typed(crypto.HMAC_Init_ex, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                                      ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int)
        self.nid2sn = _typed(crypto.OBJ_nid2sn, [ctypes.c_int], ctypes.c_char_p)


def _loaded_library(name: str) -> str | None:
    """The path of the library ``name`` ("libssl") mapped into this process (the one _ssl is
    linked with)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if f"/{name}.so" in path:
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
    path, crypto_path = _loaded_library("libssl"), _loaded_library("libcrypto")
    if path is None or crypto_path is None:
        return None
    try:
        lib = _Lib(path, crypto_path)
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


def set_verify_depth(ctx: ssl.SSLContext, depth: int) -> bool:
    """The longest chain a context verifies (nginx's proxy_ssl_verify_depth); False when
    libssl could not be reached (OpenSSL's default depth then applies)."""
    lib = _lib()
    if lib is None:
        return False
    lib.ctx_set_verify_depth(_context_pointer(ctx), depth)
    return True


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


# SSL_CONF_FLAG_FILE | _CLIENT | _SERVER | _CERTIFICATE: nginx's flags for ssl_conf_command
_CONF_FLAGS = 0x2 | 0x4 | 0x8 | 0x20


_CONF_TYPE_FILE = 2
_CONF_TYPE_DIR = 3


def conf_commands(ctx: ssl.SSLContext, commands: tuple[tuple[str, str, str], ...]) -> str | None:
    """OpenSSL configuration commands on a context (``ssl_conf_command``, as nginx's
    ngx_ssl_conf_commands): (name, value, value as a full path), the path given to commands
    that take a file or a directory; the text of the first one OpenSSL refuses, else None."""
    lib = _lib()
    if lib is None:
        return "is not supported by scriptlb on this Python (its libssl could not be reached)"
    conf = lib.conf_ctx_new()
    if not conf:
        return "SSL_CONF_CTX_new() failed"
    try:
        lib.conf_ctx_set_flags(conf, _CONF_FLAGS)
        lib.conf_ctx_set_ssl_ctx(conf, _context_pointer(ctx))
        for name, text, path in commands:
            kind = lib.conf_cmd_value_type(conf, name.encode())
            value = path if kind in (_CONF_TYPE_FILE, _CONF_TYPE_DIR) else text
            if lib.conf_cmd(conf, name.encode(), value.encode()) <= 0:
                return f'SSL_CONF_cmd("{name}", "{value}") failed'
        if lib.conf_ctx_finish(conf) != 1:
            return "SSL_CONF_finish() failed"
    finally:
        lib.conf_ctx_free(conf)
    return None


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


def set_ticket_key_list(ctx: ssl.SSLContext, keys: list[bytes]) -> None:
    """Several ssl_session_ticket_key files (key rotation), as nginx's
    ngx_ssl_ticket_key_callback: new tickets are encrypted with the first key, a ticket made
    with any of them is decrypted (and, when not the first's, renewed with it). Each key is
    TICKET_KEYS_SIZE bytes in OpenSSL's layout, used as OpenSSL's built-in tickets use theirs
    (AES-256-CBC, HMAC-SHA256), so a ticket made by a server with one of these keys alone
    (``set_ticket_keys``) resumes here and the other way round."""
    lib = _lib()
    assert lib is not None and keys and all(len(key) == TICKET_KEYS_SIZE for key in keys)
    by_name: dict[bytes, tuple[int, bytes]] = {}
    for index, key in enumerate(keys):
        by_name.setdefault(key[:TICKET_KEY_NAME_SIZE], (index, key))
    first = keys[0]

    def on_ticket(_ssl: int, name: int, iv: int, cipher_ctx: int, hmac_ctx: int, encrypt: int) -> int:
        try:
            if encrypt == 1:
                ctypes.memmove(name, first, TICKET_KEY_NAME_SIZE)
                if lib.rand_bytes(iv, TICKET_IV_SIZE) != 1:
                    return -1
                return 1 if _init_ticket_crypto(lib, first, iv, cipher_ctx, hmac_ctx, encrypt=True) else -1
            found = by_name.get(ctypes.string_at(name, TICKET_KEY_NAME_SIZE))
            if found is None:
                return 0  # an unknown key: a full handshake
            index, key = found
            if not _init_ticket_crypto(lib, key, iv, cipher_ctx, hmac_ctx, encrypt=False):
                return -1
            return 1 if index == 0 else 2  # 2: OpenSSL issues a ticket under the first key
        except Exception:  # (never let an exception cross into OpenSSL: fail this handshake)
            return -1

    callback = _TICKET_CALLBACK_TYPE(on_ticket)
    ctx.scriptlb_ticket_callback = callback  # type: ignore[attr-defined]  # (alive as long as ctx)
    pointer = _context_pointer(ctx)
    function = ctypes.cast(callback, ctypes.c_void_p)
    if lib.ctx_callback_ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, function) != 1:
        raise ssl.SSLError("SSL_CTX_set_tlsext_ticket_key_cb() failed")


def _init_ticket_crypto(lib: _Lib, key: bytes, iv: int, cipher_ctx: int, hmac_ctx: int,
                        encrypt: bool) -> bool:
    hmac_key = key[TICKET_KEY_NAME_SIZE:TICKET_KEY_NAME_SIZE + 32]
    aes_key = key[TICKET_KEY_NAME_SIZE + 32:]
    if lib.hmac_init(hmac_ctx, hmac_key, len(hmac_key), lib.sha256(), None) != 1:
        return False
    init = lib.encrypt_init if encrypt else lib.decrypt_init
    return bool(init(cipher_ctx, lib.aes_256_cbc(), None, aes_key, iv) == 1)


def client_ciphers(obj: Any) -> str:
    """$ssl_ciphers: the ciphers the client offered, in its order, by OpenSSL's names; one
    OpenSSL does not know as "0x" and its hex bytes (nginx's ngx_ssl_get_ciphers)."""
    lib = _lib()
    if lib is None:
        return ""
    connection = _connection_pointer(obj)
    size = lib.ctrl(connection, SSL_CTRL_GET_RAW_CIPHERLIST, 0, None)
    raw = ctypes.c_void_p()
    length = lib.ctrl(connection, SSL_CTRL_GET_RAW_CIPHERLIST, 0, ctypes.byref(raw))
    if length <= 0 or size <= 0 or not raw.value:
        return ""
    data = ctypes.string_at(raw.value, length)
    names = []
    for start in range(0, length - size + 1, size):
        cipher = lib.cipher_find(connection, raw.value + start)
        name = lib.cipher_get_name(cipher) if cipher else None
        names.append(name.decode("ascii", "replace") if name else "0x" + data[start:start + size].hex())
    return ":".join(names)


def client_curves(obj: Any) -> str:
    """$ssl_curves: the groups the client supports, in its order (nginx's ngx_ssl_get_curves:
    OpenSSL's short names, "0x" and the group's hex number for one it does not know)."""
    lib = _lib()
    if lib is None:
        return ""
    connection = _connection_pointer(obj)
    count = lib.ctrl(connection, SSL_CTRL_GET_GROUPS, 0, None)
    if count <= 0:
        return ""
    nids = (ctypes.c_int * count)()
    count = min(count, lib.ctrl(connection, SSL_CTRL_GET_GROUPS, 0, nids))
    names = []
    for nid in nids[:count]:
        if nid & TLSEXT_NID_UNKNOWN:
            name = lib.group_to_name(connection, nid)
            names.append(name.decode("ascii", "replace") if name else f"0x{nid & 0xffff:04x}")
        else:
            short = lib.nid2sn(nid)
            names.append(short.decode("ascii", "replace") if short else "")
    return ":".join(names)


class SessionStore(Protocol):
    """Where sessions are kept for every worker, by session ID (serialised by OpenSSL)."""

    def put(self, session_id: bytes, data: bytes, timeout: float) -> None: ...

    def get(self, session_id: bytes) -> bytes | None: ...

    def remove(self, session_id: bytes) -> None: ...


def share_sessions(ctx: ssl.SSLContext, store: SessionStore) -> bool:
    """Keep this context's sessions in ``store`` (nginx's ssl_session_cache shared:, its
    ngx_ssl_new_session / get_cached_session / remove_session), OpenSSL's own cache off; False:
    libssl is not reachable. Store errors only cost a full handshake."""
    lib = _lib()
    if lib is None:
        return False

    def session_id(session: int) -> bytes:
        length = ctypes.c_uint()
        pointer = lib.session_get_id(session, ctypes.byref(length))
        return ctypes.string_at(pointer, length.value) if pointer and length.value else b""

    def on_new(_ssl: int, session: int) -> int:
        try:
            key = session_id(session)
            size = lib.i2d_session(session, None)
            if key and 0 < size <= MAX_SESSION_SIZE:
                buffer = ctypes.create_string_buffer(size)
                cursor = ctypes.c_void_p(ctypes.addressof(buffer))
                if lib.i2d_session(session, ctypes.byref(cursor)) == size:
                    store.put(key, buffer.raw, float(lib.session_get_timeout(session)))
        except Exception:  # (never let an exception cross into OpenSSL)
            pass
        return 0  # no reference kept: OpenSSL frees the session as usual

    def on_get(_ssl: int, key: int, length: int, copy: Any) -> int | None:
        try:
            data = store.get(ctypes.string_at(key, length)) if key and length > 0 else None
            if not data:
                return None
            buffer = ctypes.create_string_buffer(data, len(data))
            cursor = ctypes.c_void_p(ctypes.addressof(buffer))
            session = lib.d2i_session(None, ctypes.byref(cursor), len(data))
            copy[0] = 0  # OpenSSL takes the one reference d2i made
            return int(session) if session else None
        except Exception:
            return None

    def on_remove(_ctx: int, session: int) -> None:
        try:
            key = session_id(session)
            if key:
                store.remove(key)
        except Exception:
            pass

    callbacks = (_NEW_SESSION_TYPE(on_new), _GET_SESSION_TYPE(on_get), _REMOVE_SESSION_TYPE(on_remove))
    ctx.scriptlb_session_callbacks = callbacks  # type: ignore[attr-defined]  # (alive as long as ctx)
    pointer = _context_pointer(ctx)
    setters = (lib.ctx_sess_set_new_cb, lib.ctx_sess_set_get_cb, lib.ctx_sess_set_remove_cb)
    for setter, callback in zip(setters, callbacks, strict=True):
        setter(pointer, ctypes.cast(callback, ctypes.c_void_p))
    mode = SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_AUTO_CLEAR | SSL_SESS_CACHE_NO_INTERNAL
    set_session_cache(ctx, mode, None)
    return True


def keep_session(obj: Any) -> None:
    """A connection ended without close_notify (aborted, reset) keeps its session resumable,
    as nginx's ngx_ssl_shutdown marks such a connection shut down both ways: else OpenSSL
    drops the session from the caches when the connection is freed."""
    lib = _lib()
    if lib is not None:
        lib.set_shutdown(_connection_pointer(obj), SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN)

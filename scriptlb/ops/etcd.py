"""A small asyncio client for etcd v3's HTTP/JSON gateway: range, put, delete, watch.

Why the gateway and not a PyPI client: etcd serves it itself (``/v3/...`` on the client port,
every etcd since 3.3), it is plain HTTP/1.1 + JSON, which this process already speaks on its
event loop, whereas the PyPI clients are either unmaintained (python-etcd3) or synchronous
gRPC stacks that would need threads in the cluster process. Keys and values travel base64.

Only ``http://`` endpoints (a TLS gateway would need the same code over an SSL context:
not done). Every call has a deadline; a watch ends (raises) when its connection does.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_RESPONSE = 16 << 20  # bytes: a range reply or one watch message larger than this is refused


class EtcdError(Exception):
    """etcd answered with an error, or could not be reached."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range request mean "every key starting with prefix"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


class Etcd:
    """One etcd endpoint (``http://HOST:PORT``)."""

    def __init__(self, url: str, timeout: float = 3.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f'invalid etcd URL "{url}" (http://HOST:PORT)')
        self.host = parts.hostname
        self.port = parts.port or 2379
        self.timeout = timeout
        self.url = f"http://{self.host}:{self.port}"

    async def _open(
        self, path: str, body: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # (not wait_for: on Python 3.11 it can lose a cancel that comes as the call ends)
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        return reader, writer

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary gateway call: the decoded JSON reply."""
        reader, writer = await self._open(path, body)
        try:
            async with asyncio.timeout(self.timeout):
                return await _read_reply(reader)
        finally:
            writer.close()

    async def range_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix``: (revision of the snapshot, key-values)."""
        reply = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        revision = int(reply.get("header", {}).get("revision", 0))
        return revision, [_kv(item) for item in reply.get("kvs", [])]

    async def put(self, key: bytes, value: bytes) -> None:
        await self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    async def delete(self, key: bytes) -> None:
        await self.call("/v3/kv/deleterange", {"key": b64(key)})

    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """(revision, events) per watch message from ``start_revision`` on; raises EtcdError when
        the revision was compacted away (the caller then reads the range again)."""
        request = {
            "create_request": {
                "key": b64(prefix),
                "range_end": b64(prefix_end(prefix)),
                "start_revision": start_revision,
            }
        }
        reader, writer = await self._open("/v3/watch", request)
        try:
            async with asyncio.timeout(self.timeout):
                status, headers = await _read_head(reader)
            if status != 200:
                raise EtcdError(f"watch answered {status}")
            async for message in _json_stream(reader, headers):
                result = message.get("result")
                if result is None:
                    raise EtcdError(f"watch failed: {message.get('error', message)}")
                if result.get("compact_revision") or result.get("canceled"):
                    raise EtcdError(f"watch canceled at revision {result.get('compact_revision', '?')}")
                revision = int(result.get("header", {}).get("revision", 0))
                events = [
                    WatchEvent(e.get("type", "PUT"), _kv(e.get("kv", {}))) for e in result.get("events", [])
                ]
                yield revision, events
        finally:
            writer.close()


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        unb64(item.get("key", "")), unb64(item.get("value", "")), int(item.get("mod_revision", 0))
    )


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise EtcdError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size > MAX_RESPONSE:
                raise EtcdError("chunk too large")
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_RESPONSE:
            raise EtcdError("reply too large")
        yield await reader.readexactly(length)
    else:
        data = await reader.read(MAX_RESPONSE + 1)
        if len(data) > MAX_RESPONSE:
            raise EtcdError("reply too large")
        yield data


async def _read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    status, headers = await _read_head(reader)
    body = b"".join([chunk async for chunk in _body_chunks(reader, headers)])
    try:
        reply = json.loads(body) if body else {}
    except ValueError:
        raise EtcdError(f"bad reply ({status}): {body[:200]!r}")
    if status != 200:
        raise EtcdError(
            f"etcd answered {status}: {reply.get('error') or reply.get('message') or body[:200]!r}"
        )
    return reply


async def _json_stream(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    """The gateway's streamed messages: JSON objects, one per line."""
    pending = b""
    async for chunk in _body_chunks(reader, headers):
        pending += chunk
        if len(pending) > MAX_RESPONSE:
            raise EtcdError("watch message too large")
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)
    raise EtcdError("watch stream ended")

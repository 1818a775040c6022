"""``proxy_request_buffering off``: the request body reaches the peer while the client is still
sending it, chunked bodies are passed on chunked to HTTP/1.1 peers, and nothing is retried once
body bytes went out."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from helpers import Backends, HttpConnection, Scriptlb, closed_port, respond, wait_for

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    log_format trail '$upstream_addr|$upstream_status|$status';
    upstream u {
        {servers}
    }
    server {
        listen 127.0.0.1:{port0};
        access_log {tmp}/access.log trail;
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_request_buffering off;
        }
    }
}
"""


class RecordingBackend:
    """A raw peer that records the bytes it receives as they arrive and answers once it saw
    ``expect_end`` (the end of the request body)."""

    def __init__(self, expect_end: bytes) -> None:
        self.received = bytearray()
        self.expect_end = expect_end
        self.first_bytes = threading.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.received.endswith(self.expect_end):
                data = await reader.read(65536)
                if not data:
                    return
                self.received += data
                self.first_bytes.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        finally:
            writer.close()


def start_recording(bk: Backends, recorder: RecordingBackend) -> None:
    bk[0].raw_handler = recorder.handle


def test_body_is_streamed_before_the_client_finished(tmp_path: Path) -> None:
    recorder = RecordingBackend(expect_end=b"second-half")
    with Backends(respond()) as bk:
        start_recording(bk, recorder)
        with Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=f"server {bk[0].addr};") as lb, \
                HttpConnection(lb.port) as client:
            client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 22\r\n\r\nfirst-half-")
            # the peer sees the head and the first half while the client still holds the rest
            wait_for(lambda: recorder.received.endswith(b"first-half-"))
            assert b"Content-Length: 22\r\n" in recorder.received
            client.send(b"second-half")
            response = client.read_response()
    assert response.status == 200 and response.body == b"ok"
    assert recorder.received.endswith(b"\r\n\r\nfirst-half-second-half")


def test_chunked_body_is_passed_on_chunked(tmp_path: Path) -> None:
    recorder = RecordingBackend(expect_end=b"0\r\n\r\n")
    with Backends(respond()) as bk:
        start_recording(bk, recorder)
        with Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=f"server {bk[0].addr};") as lb, \
                HttpConnection(lb.port) as client:
            client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
            wait_for(lambda: b"abcd" in recorder.received)
            client.send(b"2\r\nef\r\n0\r\n\r\n")
            assert client.read_response().status == 200
    head, _, body = bytes(recorder.received).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert body == b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"


def test_connect_failure_is_still_retried_but_not_after_the_body_went_out(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(502), respond(200)) as bk:
        servers = f"server 127.0.0.1:{dead}; server {bk[0].addr};"
        with Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=servers) as lb, HttpConnection(lb.port) as client:
            response = client.request("PUT", "/", body=b"payload")
        assert response.status == 502  # the peer's own 502, after the refused one was skipped
    rows = (tmp_path / "access.log").read_text().splitlines()
    assert rows == [f"127.0.0.1:{dead}, {bk[0].addr}|502, 502|502"]
    assert bk[0].requests[0].body == b"payload"

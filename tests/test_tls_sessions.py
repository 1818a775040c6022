"""The ssl_session_cache shared: zone's store: parsing, a round trip, expiry, a cold start's
clearing and the directory's permissions (sessions hold master secrets)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from scriptlb.http.tls_sessions import clear_zones, sessions_directory, shared_sessions, shared_zone


def test_the_shared_word_is_found_among_the_others() -> None:
    assert shared_zone("builtin:1000 shared:SSL:10m") == ("SSL", 10 * 1024 * 1024)
    assert shared_zone("shared:tls:64k") == ("tls", 64 * 1024)
    assert shared_zone("builtin:1000") is None and shared_zone("none") is None


def test_sessions_round_trip_expire_and_go_on_a_cold_start(tmp_path: Path) -> None:
    directory = sessions_directory(str(tmp_path))
    store = shared_sessions(directory, "SSL", 1024 * 1024)
    store.put(b"\x01" * 32, b"session one", 300)
    store.put(b"\x02" * 32, b"session two", 1)
    assert store.get(b"\x01" * 32) == b"session one"
    assert store.get(b"\x03" * 32) is None
    store.remove(b"\x01" * 32)
    assert store.get(b"\x01" * 32) is None
    deadline = time.monotonic() + 10
    while store.get(b"\x02" * 32) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.get(b"\x02" * 32) is None  # (ssl_session_timeout's lifetime)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    store.put(b"\x04" * 32, b"kept until a cold start", 300)
    clear_zones(str(tmp_path))
    assert not (Path(directory) / "SSL" / "data.mdb").exists()

"""pytest fixtures for testing hooks with ``HookKit`` (loaded by the ``pytest11`` entry point).

    def test_same_uri_same_peer(hook_file):
        kit = hook_file("hooks/hash_by_uri.py", peers=["127.0.0.1:9001", "127.0.0.1:9002"])
        assert kit.run(uri="/a").peer == kit.run(uri="/a").peer

    def test_block(hook_conf):
        kit = hook_conf("conf/scriptlb.conf", upstream="backend")
        assert kit.run(uri="/").outcome == "ok"

Every kit a test makes is closed after it (its throwaway directory removed, the hook API's
clock and shared dicts put back). The kit module is imported only when a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def hook_file() -> Iterator[Callable[..., Any]]:
    """``hook_file(path, peers=..., backup=..., phase="balancer"|"log", package_path=...,
    shared_dicts={"name": "1m"}, method="", server_args="", proxy="", timeout_ms=10)``:
    a ``HookKit`` for a hook file."""
    from scriptlb.testing.kit import HookKit

    kits: list[HookKit] = []

    def make(path: Any, **options: Any) -> HookKit:
        _close(kits)  # one kit at a time: the hook API's clock and shared dicts are per process
        kit = HookKit.from_file(path, **options)
        kits.append(kit)
        return kit

    yield make
    _close(kits)


@pytest.fixture
def hook_conf() -> Iterator[Callable[..., Any]]:
    """``hook_conf(conf_file, upstream=None, prefix=None)``: a ``HookKit`` for an upstream's
    hook (``_file`` or ``_block``) and its location's log hook, from a config file."""
    from scriptlb.testing.kit import HookKit

    kits: list[HookKit] = []

    def make(conf_file: Any, upstream: str | None = None, prefix: str | None = None) -> HookKit:
        _close(kits)
        kit = HookKit.from_conf(conf_file, upstream, prefix)
        kits.append(kit)
        return kit

    yield make
    _close(kits)


def _close(kits: list[Any]) -> None:
    while kits:
        kits.pop().close()

"""Shared test set-up: the tiers (``unit`` / ``protocol`` / ``integration``), the event loops the
protocol tier runs on, and the process-wide state every test starts from.

Tiers (docs/testing.md): every test file is classified in ``TIERS``; a test inherits its file's
tier unless it carries a tier marker itself, and a test marked ``nginx``, ``slow`` or ``fuzz`` is
``integration`` wherever it lives. ``pytest -m unit`` runs the pure tests in seconds; the
``unit`` tier is checked while it runs (no sockets bound or connected, no processes started).
The ``protocol`` tier runs on asyncio's default event loop and on uvloop (the product's loop).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

TIER_NAMES = ("unit", "protocol", "integration")

# Markers that only real processes or long runs carry: such a test is integration wherever it is.
INTEGRATION_MARKERS = ("nginx", "slow", "fuzz")

# unit: pure functions and objects in this process (no sockets, no processes, no event loop).
# protocol: the wire protocol in this process: protocol objects fed bytes on an event loop, or a
#   worker thread on loopback sockets, with tiny asyncio backends; run on both event loops.
# integration: real processes (scriptlb masters, nginx, Redis, etcd), several subsystems together
#   (hooks + statistics + shared dicts in a live worker), long or load-driven runs.
TIERS: dict[str, str] = {
    "test_access_status.py": "protocol",
    "test_add_trailer.py": "protocol",
    "test_ssi.py": "protocol",
    "test_proxy_store.py": "protocol",
    "test_listen_options.py": "protocol",
    "test_expect_continue_nginx.py": "protocol",
    "test_limit_rate.py": "protocol",
    "test_architecture.py": "unit",
    "test_balancer_api.py": "unit",
    "test_balancer_trace.py": "integration",
    "test_balancing_ewma.py": "unit",
    "test_balancing_facade.py": "unit",
    "test_balancing_hash.py": "unit",
    "test_balancing_ip_hash.py": "unit",
    "test_balancing_least_conn.py": "unit",
    "test_balancing_least_time.py": "unit",
    "test_balancing_random.py": "unit",
    "test_bench_smoke.py": "integration",
    "test_cli.py": "integration",
    "test_cluster.py": "integration",
    "test_cluster_units.py": "unit",
    "test_compat_directives.py": "protocol",
    "test_compat_if_location.py": "protocol",
    "test_compat_phases.py": "protocol",
    "test_compat_redirects.py": "protocol",
    "test_config_directives.py": "unit",
    "test_config_lexer.py": "unit",
    "test_config_nginx.py": "integration",
    "test_config_parser.py": "unit",
    "test_config_python.py": "unit",
    "test_config_units.py": "unit",
    "test_default_conf.py": "integration",
    "test_doc_figures.py": "unit",
    "test_downstream.py": "protocol",
    "test_dynamic_pass.py": "protocol",
    "test_example_hooks_state.py": "integration",
    "test_fastest_first.py": "integration",
    "test_fuzz_clients.py": "integration",
    "test_health.py": "integration",
    "test_hook_breaker.py": "unit",
    "test_hook_run_path.py": "unit",
    "test_hooks.py": "unit",
    "test_hooks_integration.py": "integration",
    "test_hooks_keepalive_pool.py": "integration",
    "test_hooks_keepalive_ported.py": "integration",
    "test_hooks_kit.py": "unit",
    "test_hooks_reload.py": "integration",
    "test_hooktool.py": "unit",
    "test_hostile_clients.py": "protocol",
    "test_limits.py": "protocol",
    "test_line_ends.py": "unit",
    "test_locations.py": "unit",
    "test_log_phase.py": "integration",
    "test_logs.py": "unit",
    "test_map.py": "unit",
    "test_metrics.py": "integration",
    "test_overload.py": "protocol",
    "test_peer_stats_live.py": "integration",
    "test_plus_api.py": "integration",
    "test_operating.py": "integration",
    "test_pool.py": "protocol",
    "test_porting.py": "unit",
    "test_porting_process.py": "integration",
    "test_process.py": "integration",
    "test_process_units.py": "protocol",
    "test_proxy.py": "protocol",
    "test_proxy_bind.py": "protocol",
    "test_proxy_flow.py": "protocol",
    "test_proxy_hook_seam.py": "protocol",
    "test_proxy_nginx.py": "integration",
    "test_proxy_streaming.py": "protocol",
    "test_proxy_trail.py": "protocol",
    "test_realip.py": "protocol",
    "test_reference.py": "unit",
    "test_replay.py": "integration",
    "test_replay_fidelity.py": "integration",
    "test_request_view.py": "integration",
    "test_responses.py": "unit",
    "test_retry.py": "unit",
    "test_round_robin.py": "unit",
    "test_sandbox_balancers.py": "unit",
    "test_sandbox_c_work.py": "unit",
    "test_sandbox_classes.py": "unit",
    "test_sandbox_corpus.py": "unit",
    "test_sandbox_fuse.py": "integration",
    "test_sandbox_known_numbers.py": "unit",
    "test_sandbox_redteam.py": "unit",
    "test_sandbox_semantics.py": "unit",
    "test_service.py": "integration",
    "test_shared_dict.py": "unit",
    "test_stats.py": "unit",
    "test_status.py": "unit",
    "test_stream.py": "protocol",
    "test_stream_access.py": "protocol",
    "test_geo.py": "protocol",
    "test_stream_script.py": "protocol",
    "test_stream_ssl.py": "protocol",
    "test_stream_udp.py": "integration",
    "test_access_log_files.py": "protocol",
    "test_tiers.py": "unit",
    "test_tls.py": "protocol",
    "test_tls_listeners.py": "protocol",
    "test_tls_sessions.py": "unit",
    "test_tls_termination.py": "protocol",
    "test_tls_upstream.py": "protocol",
    "test_upstream.py": "protocol",
    "test_variables.py": "unit",
    "test_websocket.py": "protocol",
    "test_worker_hooks.py": "integration",
}

LOOP_KINDS = ("asyncio", "uvloop")


def tier_of(node: pytest.Item | pytest.Function | object) -> str | None:
    """A test's tier: its own tier marker, else integration for process/long-run markers, else
    its file's entry in TIERS (None: the file is not classified, which test_tiers reports)."""
    get_marker = node.get_closest_marker  # type: ignore[attr-defined]
    for name in TIER_NAMES:
        if get_marker(name) is not None:
            return name
    if any(get_marker(name) is not None for name in INTEGRATION_MARKERS):
        return "integration"
    return TIERS.get(Path(str(node.path)).name)  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Protocol tests run once per event loop (``loop_kind``), unless the test chose its loop."""
    if "loop_kind" not in metafunc.fixturenames or "loop_kind" in _own_parameters(metafunc):
        return
    if tier_of(metafunc.definition) == "protocol":
        metafunc.parametrize("loop_kind", LOOP_KINDS, indirect=True)


def _own_parameters(metafunc: pytest.Metafunc) -> set[str]:
    names: set[str] = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if tier is not None:
            item.add_marker(tier)


# --------------------------------------------------------------------------- event loops


@pytest.fixture(autouse=True)
def loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """The event loop a protocol test runs on ("asyncio" or "uvloop"); other tiers get uvloop,
    the product's loop. ``helpers.Scriptlb`` and the ``loop`` fixture follow it."""
    import helpers

    kind = getattr(request, "param", "uvloop")
    previous = helpers.LOOP_KIND
    helpers.LOOP_KIND = kind
    yield kind
    helpers.LOOP_KIND = previous


@pytest.fixture
def loop(loop_kind: str) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh, not running, event loop of the test's kind, closed afterwards: what protocol
    objects fed by hand (fake transports) are built on."""
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    yield loop
    loop.close()


# --------------------------------------------------------------------------- shared state


@pytest.fixture(autouse=True)
def _process_wide_defaults() -> Iterator[None]:
    """Every test starts and ends with the hook runtime's process-wide settings at their
    defaults (no package path, code cache on): worker threads and hook runners configure them."""
    from scriptlb.config.model import PythonConf
    from scriptlb.hookrt import hooks

    hooks.configure(PythonConf())
    yield
    hooks.configure(PythonConf())


@pytest.fixture(autouse=True)
def _closed_ports() -> Iterator[None]:
    """``helpers.closed_port()`` keeps its ports bound for the whole test, then frees them."""
    yield
    import helpers

    helpers.release_closed_ports()


# --------------------------------------------------------------------------- the unit tier's check


class RealIOInUnitTest(AssertionError):
    """A ``unit`` test reached for a socket or a process: it belongs to another tier."""


def _refuse(what: str) -> Callable[..., object]:
    def refused(*args: object, **kwargs: object) -> object:
        raise RealIOInUnitTest(f"a unit test {what}: mark it protocol or integration (tests/conftest.py)")

    return refused


@pytest.fixture(autouse=True)
def _unit_tier_stays_pure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("unit") is None:
        return
    import socket

    monkeypatch.setattr(socket.socket, "bind", _refuse("bound a socket"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("connected a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("connected a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("started a process"))
    monkeypatch.setattr(os, "fork", _refuse("forked"))


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def root() -> Path:
    return ROOT


def scriptlb_cmd(*args: str) -> list[str]:
    """The command line that runs scriptlb from this checkout with the test interpreter."""
    return [PYTHON, "-m", "scriptlb", *args]


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

# A safety net for the sandbox's memory-bomb tests: should a guard ever miss one, the test run
# fails with MemoryError instead of driving the machine (CI's too) into the OOM killer.
# Processes the tests start inherit it. 12 GiB of address space is far above what the suite uses.
_ADDRESS_SPACE_CAP = 12 << 30
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
if _soft == resource.RLIM_INFINITY or _soft > _ADDRESS_SPACE_CAP:
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_CAP, _hard))

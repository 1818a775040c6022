"""Every request object, and each test double of one, against scriptlb.request_view's protocols.

Not a test module: tests/test_request_view.py runs mypy over this file. Each function below
returns its argument as the protocol it must meet, so a member that one of them lacks or
types differently (a synthetic ``header()`` that forgot Cookie joining would still pass; one
that returns bytes would not) is a type error here.
"""

from __future__ import annotations

from fake_request import FakeExchange, Try

from scriptlb.replay.engine import ReplayExchange
from scriptlb.replay.synthetic import SyntheticExchange
from scriptlb.replay.synthetic import TryRecord as SyntheticTry
from scriptlb.request.attempt import TryRecord
from scriptlb.request.exchange import Exchange
from scriptlb.request_view import HookRequest, RequestView, StreamRequest, TryView
from scriptlb.stream.session import Session


def proxied(ex: Exchange) -> RequestView:
    return ex


def synthetic(ex: SyntheticExchange) -> RequestView:
    return ex


def replayed(ex: ReplayExchange) -> RequestView:
    return ex


def variables_double(ex: FakeExchange) -> RequestView:
    return ex


def stream_session(session: Session) -> StreamRequest:
    return session


def stream_session_for_hooks(session: Session) -> HookRequest:
    return session


def proxied_try(record: TryRecord) -> TryView:
    return record


def synthetic_try(record: SyntheticTry) -> TryView:
    return record


def variables_double_try(record: Try) -> TryView:
    return record


class _NotARequest:
    """The control: a class lacking nearly everything, which mypy must refuse (were this
    check to stop working, the ignore below would be unused, itself an error)."""

    method = "GET"


def control(ex: _NotARequest) -> RequestView:
    return ex  # type: ignore[return-value]

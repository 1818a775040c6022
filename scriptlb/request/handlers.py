"""Content handlers a location can have instead of proxy_pass or return: ``stub_status``,
``api`` (nginx Plus's REST API, ``scriptlb.ops.plus_api``) and ``prometheus`` (``scriptlb.ops.metrics``).

``content_handler(conf, runtime)`` gives the location's ``content(exchange)``; each handler
answers with ``exchange.respond(status, headers, body)`` or ``exchange.finish_with_page``.
The modules behind ``api`` and ``prometheus`` are imported only by configs that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import LocationConf


def content_handler(conf: LocationConf, runtime: Any) -> Callable[[Any], None] | None:
    if conf.handler == "stub_status":
        from scriptlb.ops.status import stub_status

        return stub_status
    if conf.handler == "api":
        from scriptlb.ops.plus_api import Api

        return Api(runtime, write=conf.api_write)
    if conf.handler == "prometheus":
        from scriptlb.ops.metrics import prometheus

        return prometheus
    return None

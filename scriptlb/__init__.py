"""scriptlb: an OpenResty-style scriptable HTTP load balancer (see docs/architecture.md)."""

from importlib import metadata


def version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("scriptlb")
    except metadata.PackageNotFoundError:
        return "unknown"

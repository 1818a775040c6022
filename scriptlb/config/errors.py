"""ConfigError: one failed load, rendered exactly like nginx's ``[emerg]`` lines."""

from __future__ import annotations

from scriptlb.config.model import Source

COMMAND_LINE = "command line"  # where -g directives come from, as nginx names it


class ConfigError(Exception):
    """A configuration that cannot be loaded.

    ``str(err)`` is nginx's text without the program prefix, e.g.
    ``[emerg] unknown directive "fooo" in /abs/conf/x.conf:12``; the CLI prints
    ``scriptlb: `` + that. ``source`` is None for messages nginx prints without a location
    (a missing main config file); ``Source(COMMAND_LINE, 0)`` renders as ``in command line``.
    """

    def __init__(self, message: str, source: Source | None = None, level: str = "emerg") -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.level = level

    def __str__(self) -> str:
        return f"[{self.level}] {self.message}{where(self.source)}"


def where(source: Source | None) -> str:
    """nginx's location suffix: `` in /abs/file.conf:12``, `` in command line`` or nothing."""
    if source is None:
        return ""
    if source.file == COMMAND_LINE:
        return f" in {COMMAND_LINE}"
    return f" in {source}"

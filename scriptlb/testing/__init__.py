"""The test kit for hook authors: ``HookKit`` (``scriptlb.testing.kit``) and its pytest
fixtures (``scriptlb.testing.plugin``, registered as a ``pytest11`` entry point, so installing
scriptlb is enough). See docs/hooks.md, "Testing a hook"."""

from scriptlb.testing.kit import HookKit, HookResult, LogResult, RequestResult, TryResult

__all__ = ["HookKit", "HookResult", "LogResult", "RequestResult", "TryResult"]

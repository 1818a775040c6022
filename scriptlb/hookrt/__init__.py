"""The hook runtime: what a hook sees (api) and how hooks are compiled and run (hooks)."""

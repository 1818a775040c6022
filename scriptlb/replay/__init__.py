"""``scriptlb replay``: a configuration's balancing (its hook, or its built-in method) against
recorded traffic, offline and in virtual time. See docs/replay.md."""

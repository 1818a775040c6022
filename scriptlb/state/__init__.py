"""State shared by the workers of one instance: peer statistics, shared dicts, run-time peer lists."""

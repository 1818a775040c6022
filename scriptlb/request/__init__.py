"""One request, phase by phase: rewrite, access, the tries loop, error pages, the log phase."""

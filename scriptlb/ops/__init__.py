"""Operating an instance: status counters, health checks, metrics, Plus API, discovery, cluster process."""

"""The process model: master, workers, listening sockets, signals, daemonizing, service support."""

"""The ``stream`` block: TCP (and TLS by SNI) balancing with the http hooks and balancers."""

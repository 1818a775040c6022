"""HTTP/1.x connections: the client side, the peer side, the keep-alive pool, TLS and tunnels."""

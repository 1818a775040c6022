# Per-path timeouts: reports may take 30 s to answer, the API must answer within 2 s. The
# values apply to this request only (every try of it); other requests keep the location's.

uri = ngx.var.uri
if uri.startswith("/reports/"):
    balancer.set_timeouts(1, 5, 30)      # connect, send, read: seconds, millisecond precision
elif uri.startswith("/api/"):
    balancer.set_timeouts(0.5, 1, 2)

peers = upstream.get_primary_peers()
balancer.set_current_peer(peers[ngx.crc32_short(uri) % len(peers)]["name"])

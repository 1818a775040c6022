# Deny: refuse requests before any peer is contacted. ngx.exit(status >= 300) ends the request
# with that status, exactly as in balancer_by_lua (the rest of the hook still runs, so return
# early by structure: here the peer is only set in the else branch).

BLOCKED_PREFIXES = ("/admin", "/internal/")

if ngx.var.uri.startswith(BLOCKED_PREFIXES) or ngx.var.http_x_blocked_token is not None:
    ngx.log(ngx.NOTICE, "denied ", ngx.var.request_uri)
    ngx.exit(ngx.HTTP_FORBIDDEN)
else:
    peers = upstream.get_primary_peers()
    balancer.set_current_peer(peers[ngx.crc32_short(ngx.var.uri) % len(peers)]["name"])

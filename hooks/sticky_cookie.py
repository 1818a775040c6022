# Sticky sessions by a route cookie, as nginx's `sticky route` (and lua-resty-balancer setups):
# the backend application issues the cookie, the balancer only honours it.
#
# Why the backend sets the cookie: a balancer hook runs before the upstream is contacted and
# scriptlb has no response-header phase for hooks yet (no header_filter_by_python, no
# add_header), so the hook cannot add `Set-Cookie` itself. The application answers with
#     Set-Cookie: route=<id>; Path=/
# where <id> is chash_rings.route_id(its "host:port" as written in the upstream): the first 8
# hex digits of md5 of that name, stable across reloads and not the raw address
# (`printf %s 127.0.0.1:9001 | md5sum | cut -c1-8`).
#
# * A valid cookie whose peer is healthy: that peer.
# * No cookie, an unknown or stale id, or a peer that failed within peer_health.FAIL_TIMEOUT:
#   a live peer by consistent hash of the client address (`hash $remote_addr consistent`), so
#   the client still sticks until its new backend sets a fresh cookie.
# * A failed try: the peer is remembered as failed (this worker, FAIL_TIMEOUT seconds) and the
#   retry goes to another peer by the same client-address hash, skipping the peers tried, so the
#   next request with the old cookie is sent straight to a live peer.
#
#   http {
#       python_package_path "hooks/lib/?.py";
#       upstream backend {
#           server 127.0.0.1:9001;
#           server 127.0.0.1:9002;
#           balancer_by_python_file hooks/sticky_cookie.py;
#       }
#   }

import chash_rings
import peer_health

COOKIE_VARIABLE = "cookie_route"  # the cookie's nginx variable: "cookie_" + its name

ctx = ngx.ctx
tried = ctx.setdefault("tried", [])
state, status = balancer.get_last_failure()
node = None
if state is None:
    route = ngx.var[COOKIE_VARIABLE]
    if route:
        node = chash_rings.route_table().get(route)
        if node is not None and not peer_health.is_up(node):
            node = None
else:
    peer_health.mark_failed(tried[-1])
    ngx.log(ngx.WARN, "sticky peer ", tried[-1], " failed (", state, " ", status, "), moving on")

if node is None:
    ring = chash_rings.ring()
    skip = tried + peer_health.failed_peers()
    node, _ = ring.find(ngx.var.remote_addr, tried=skip)
    if node is None:  # every untried peer failed lately: better one of them than none
        node, _ = ring.find(ngx.var.remote_addr, tried=tried)

if node is None:
    ngx.log(ngx.ERR, "sticky_cookie: no untried peer left")
else:
    tried.append(node)
    balancer.set_current_peer(node)

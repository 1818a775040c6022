# Consistent hashing on a request header (a user id), falling back to the URI without it: the
# same user always reaches the same peer, and adding or removing a server moves only the users
# of that server (nginx's `hash $http_x_user_id consistent`, the ring being nginx's ketama
# points). The ring comes from scriptlb.balancers.chash, built once per worker and peer list in
# hooks/lib/chash_rings.py. A failed try moves to the next distinct peer clockwise on the ring,
# never back to one this request already tried (lua-resty-balancer's chash:next).
#
#   http {
#       python_package_path "hooks/lib/?.py";
#       upstream backend {
#           server 127.0.0.1:9001;
#           server 127.0.0.1:9002;
#           balancer_by_python_file hooks/chash_by_header.py;
#       }
#   }

import chash_rings

# the request header whose value is the hash key, as nginx names its variable: X-User-Id is
# http_x_user_id (lower case, "-" as "_"); a constant name is cheaper than building it per run
HEADER_VARIABLE = "http_x_user_id"

ring = chash_rings.ring()
ctx = ngx.ctx
tried = ctx.setdefault("tried", [])
state, status = balancer.get_last_failure()
if state is None:
    key = ngx.var[HEADER_VARIABLE] or ngx.var.uri
    node, index = ring.find(key)
else:
    node, index = ring.next(ctx["index"], tried)
    ngx.log(ngx.WARN, tried[-1], " failed (", state, " ", status, "), next on the ring: ", node)

if node is None:  # every peer tried: no peer set, so the upstream's own balancer takes the try
    ngx.log(ngx.ERR, "chash_by_header: no untried peer left")
else:
    tried.append(node)
    ctx["index"] = index
    balancer.set_current_peer(node)

# Retry on a different peer, OpenResty style: the upstream has a single placeholder server (so
# nginx's own tries budget is 1), the hook keeps its own peer list, and it grants one more try
# per failure with set_more_tries() until every peer has been tried once.
#
#   upstream backend {
#       server 127.0.0.1:9001;               # placeholder: the hook always sets the peer
#       balancer_by_python_file hooks/retry_other_peer.py;
#   }
#   location / { proxy_pass http://backend; proxy_next_upstream error timeout http_502; }

PEERS = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]

tried = ngx.ctx.setdefault("tried", [])
state, status = balancer.get_last_failure()
if state is None:
    index = ngx.crc32_short(ngx.var.uri) % len(PEERS)  # first try: spread by URI
else:
    ngx.log(ngx.WARN, PEERS[tried[-1]], " failed (", state, " ", status, "), trying the next peer")
    index = (tried[-1] + 1) % len(PEERS)

tried.append(index)
ok, err = balancer.set_current_peer(PEERS[index])
if not ok:
    ngx.log(ngx.ERR, "failed to set the current peer: ", err)
elif len(tried) < len(PEERS):
    # one more try if this one fails; set_more_tries only counts when a peer was set
    balancer.set_more_tries(1)

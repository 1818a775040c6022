# Pick a peer by the CRC32 of the URI, like nginx's `hash $uri` (without consistency):
# the same URI always goes to the same server line of the upstream.
#
#   upstream backend {
#       server 127.0.0.1:9001;
#       server 127.0.0.1:9002;
#       balancer_by_python_file hooks/hash_by_uri.py;
#   }
#
# Lua original:
#   local peers = {"127.0.0.1:9001", "127.0.0.1:9002"}
#   local i = ngx.crc32_short(ngx.var.uri) % #peers + 1
#   local ok, err = balancer.set_current_peer(peers[i])

peers = upstream.get_primary_peers()
peer = peers[ngx.crc32_short(ngx.var.uri) % len(peers)]

ok, err = balancer.set_current_peer(peer["name"])
if not ok:
    ngx.log(ngx.ERR, "failed to set the current peer: ", err)

# Canary: the LAST server line of the upstream is the canary. "X-Canary: always" / "never"
# force the choice; otherwise CANARY_PERCENT percent of users (by their X-User header, or their
# address) go to the canary, always the same users, and the rest spread over the other peers.

CANARY_PERCENT = 10

peers = upstream.get_primary_peers()
canary, stable = peers[-1], peers[:-1]

forced = ngx.var.http_x_canary
user = ngx.var.http_x_user or ngx.var.remote_addr
bucket = ngx.crc32_short(user) % 100

if forced == "always" or (forced != "never" and bucket < CANARY_PERCENT):
    peer = canary
else:
    peer = stable[ngx.crc32_long(user) % len(stable)]

ngx.ctx["canary"] = peer is canary
balancer.set_current_peer(peer["name"])

# Sticky sessions: a client carrying a "route" cookie (or an X-Session header) always reaches
# the same peer; clients without either stick by address. If the sticky peer fails, the retry
# goes to the next peer in line (the failed one is remembered in ngx.ctx for this request).

peers = upstream.get_primary_peers()
key = ngx.var.cookie_route or ngx.var.http_x_session or ngx.var.remote_addr
index = ngx.crc32_long(key) % len(peers)

state, status = balancer.get_last_failure()
if state is not None:
    # a retry: move on from the peer that failed, never back to it within this request
    failed = ngx.ctx.setdefault("failed", [])
    failed.append(ngx.ctx["index"])
    candidates = [i for i in range(len(peers)) if i not in failed] or [index]
    index = candidates[0]
    ngx.log(ngx.WARN, "sticky peer failed (", state, " ", status, "), moving to ", peers[index]["name"])

ngx.ctx["index"] = index
balancer.set_current_peer(peers[index]["name"])

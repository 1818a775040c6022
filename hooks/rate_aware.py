# Rate-aware routing: every try goes to the peer that has served the fewest tries in the current
# one-second window, counted in a shared dict by all workers, as long as that count is below
# LIMIT; when every untried peer is at its limit the request ends with 503 (ngx.exit with a
# status >= 300 ends it without contacting a peer; below 300 would fall back instead).
#
#   http {
#       python_shared_dict rate 1m;
#       upstream backend {
#           server 127.0.0.1:9001;
#           server 127.0.0.1:9002;
#           balancer_by_python_file hooks/rate_aware.py;
#       }
#   }
#
# Keys are "<peer>@<unix second>" with a TTL of a few seconds: old windows expire on their own,
# and a window's counts are readable (ngx.shared.rate.get_keys()) while they live. incr is
# atomic across workers; a worker that loses the race for a peer's last slot gives it back and
# moves on, so no window ever admits more than LIMIT tries per peer.

LIMIT = 50  # tries per peer per second, all workers together
ZONE = "rate"  # the python_shared_dict zone
WINDOW_TTL = 3  # seconds a window's counters live

counters = ngx.shared[ZONE]
window = "@" + str(ngx.time())
tried = ngx.ctx.setdefault("tried", [])

if counters is None:  # no such zone: set no peer, so the upstream's own balancer serves
    ngx.log(ngx.ERR, "rate_aware: no python_shared_dict ", ZONE)
else:
    loads = []
    for p in upstream.get_primary_peers():
        if not p["down"] and p["name"] not in tried:
            count = counters.get(p["name"] + window)[0] or 0
            loads.append((count, p["id"], p["name"]))
    loads.sort()  # least loaded first; equal counts in the upstream's order
    chosen = None
    for count, _, name in loads:
        if count >= LIMIT:
            break  # sorted: every later peer is at its limit too
        new, err, _ = counters.incr(name + window, 1, 0, WINDOW_TTL)
        if new is None:
            ngx.log(ngx.ERR, "rate_aware: cannot count ", name, ": ", err)
        elif new <= LIMIT:
            chosen = name
            break
        else:
            counters.incr(name + window, -1)  # lost the last slot to another worker: give it back
    if chosen is None:
        ngx.log(ngx.WARN, "rate_aware: every peer is at ", LIMIT, " tries this second")
        ngx.exit(503)
    else:
        tried.append(chosen)
        balancer.set_current_peer(chosen)

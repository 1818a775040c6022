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
#
# Cluster mode (several scriptlb nodes sharing the limit): make ZONE cluster-wide and give each
# node a local zone for its own share, then set NODES:
#
#       python_shared_dict rate 1m sync=redis://127.0.0.1:6379/0 sync_interval=50ms;
#       python_shared_dict rate_local 1m;
#
# ZONE's counts are then the cluster's, as of the last merge (sync_interval + one round trip
# ago) plus this node's own tries since: the other nodes' latest tries are not seen yet. So a
# node admits freely only while the cluster is below LIMIT * (1 - HEADROOM); in the last
# HEADROOM it admits only its fair share (LIMIT / NODES, counted in LOCAL_ZONE). Under even
# load the cluster stays within a few percent of LIMIT (docs/cluster.md has the figures);
# under uneven load, a busy node gets at least its share and the headroom.

LIMIT = 50  # tries per peer per second, all workers (and in cluster mode, all nodes) together
ZONE = "rate"  # the python_shared_dict zone
WINDOW_TTL = 3  # seconds a window's counters live
NODES = 1  # scriptlb nodes sharing ZONE through sync=; 1: single node, LOCAL_ZONE unused
LOCAL_ZONE = "rate_local"  # cluster mode: this node's own tries, not synced
HEADROOM = 0.1  # cluster mode: the last share of LIMIT that nodes only take their share of

counters = ngx.shared[ZONE]
window = "@" + str(ngx.time())
tried = ngx.ctx.setdefault("tried", [])

mine = ngx.shared[LOCAL_ZONE] if NODES > 1 else None
free = LIMIT * (1 - HEADROOM) if NODES > 1 else LIMIT  # up to here no node holds back
share = LIMIT / NODES  # cluster mode: this node's part of the last HEADROOM

if counters is None or (NODES > 1 and mine is None):
    # no such zone: set no peer, so the upstream's own balancer serves
    ngx.log(ngx.ERR, "rate_aware: no python_shared_dict ", ZONE if counters is None else LOCAL_ZONE)
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
        key = name + window
        new, err, _ = counters.incr(key, 1, 0, WINDOW_TTL)
        own = (mine.incr(key, 1, 0, WINDOW_TTL)[0] or 0) if mine is not None else 0
        if new is not None and (new <= free or (new <= LIMIT and own <= share)):
            chosen = name
            break
        if new is None:
            ngx.log(ngx.ERR, "rate_aware: cannot count ", name, ": ", err)
        else:
            counters.incr(key, -1)  # lost the last slot to another worker: give it back
        if mine is not None:
            mine.incr(key, -1)
    if chosen is None:
        ngx.log(ngx.WARN, "rate_aware: every peer is at ", LIMIT, " tries this second")
        ngx.exit(503)
    else:
        tried.append(chosen)
        balancer.set_current_peer(chosen)

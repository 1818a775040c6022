# Fastest first ("快者优先", after James Pan's 2015 post): a log_by_python hook that turns the
# upstream's live statistics into round-robin weights, so the fastest peers get most requests.
# The balancing itself stays nginx's smooth weighted round robin: no balancer hook is needed,
# as in the post, where log_by_lua set weights through a patched lua-upstream-nginx-module.
#
#   location / { proxy_pass http://backend; log_by_python_file hooks/fastest_first.py; }
#   python_shared_dict fastest_first 1m;   # (http) optional: one evaluation per EVERY seconds
#
# The post's four rules:
#   1. the longer a peer's response time, the smaller its weight: weight = W_MAX * fastest / own
#      (its ewma of $upstream_response_time, kept by scriptlb for every peer across workers);
#   2. a peer that failed within its fail_timeout gets weight 1 (not down: it is still probed,
#      so it comes back by itself once it recovers and fail_timeout has passed);
#   3. weights change only when it matters: at most every EVERY seconds for the whole instance
#      (a shared-dict add acts as the timer), and only by more than a quarter (or to/from 1),
#      so the round robin is not reset by jitter;
#   4. the fastest peer is always found: a peer never measured gets W_MAX, and no weight goes
#      below 1, so every peer keeps being sampled and a slow peer that speeds up is noticed.
# Set `max_fails=0` on the servers to let this hook alone handle failing peers; with nginx's
# default max_fails=1 the round robin also skips a failed peer for fail_timeout.

W_MAX = 10  # the weight of the fastest peer(s)
EVERY = 0.1  # seconds between evaluations (with the shared dict)
# Averages below this (1 ms, the resolution of nginx's $upstream_response_time, which the post
# read) count as this: a peer answering faster would otherwise have an average near 0 and make
# every ratio huge, and below a millisecond a difference between peers is the machine's noise
# (a busy CPU, a cold connection), not a faster peer: 0.2 ms against 0.5 ms is not weight 10
# against 4.
RESOLUTION = 0.001


def failing(peer, now):
    last = peer["last_failure_time"]
    return last is not None and now - last < peer["fail_timeout"]


def target_weight(peer, fastest, now):
    if failing(peer, now):
        return 1
    if peer["ewma"] is None or fastest is None:
        return W_MAX  # never measured (or nothing to compare with): give it a real chance
    own = max(peer["ewma"], RESOLUTION)
    return max(1, min(W_MAX, round(W_MAX * max(fastest, RESOLUTION) / own)))


def worth_changing(current, wanted):
    return wanted != current and (wanted == 1 or current == 1 or abs(wanted - current) * 4 > current)


timer = ngx.shared.fastest_first
due = timer is None or timer.add("evaluated", True, EVERY)[0]
if due and ngx.var.upstream_addr is not None:  # (a location's return or error page: nothing to learn)
    now = ngx.now()
    peers = upstream.get_primary_peers()
    healthy = [p["ewma"] for p in peers if p["ewma"] is not None and not failing(p, now)]
    fastest = min(healthy) if healthy else None
    for peer in peers:
        wanted = target_weight(peer, fastest, now)
        if worth_changing(peer["weight"], wanted):
            upstream.set_peer_weight(False, peer["id"], wanted)

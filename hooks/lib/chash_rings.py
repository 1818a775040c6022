# Per-worker tables for hooks/chash_by_header.py and hooks/sticky_cookie.py, built from
# scriptlb.balancers at a worker's first request. A module on python_package_path runs once per
# worker and keeps its globals, so these caches survive across requests (hook globals do not).
#
# They are keyed by upstream name only, because reading and fingerprinting the peer list on
# every run would cost more than the lookup itself (~15 us): a configuration's peers never
# change under a worker, since a reload starts new workers, whose modules start empty.

from scriptlb.balancers import chash

MAX_TABLES = 64  # upstreams: a bounded cache even if a hook is shared by many upstreams
ROUTE_ID_LENGTH = 8  # hex characters of md5(peer name): stable, short, not the raw address

rings = {}  # upstream name -> chash ring of its primary peers that are not down
routes = {}  # upstream name -> {route id: peer name}


def live_weights():
    """{name: weight} of this request's upstream's primary peers, without those marked down."""
    return {p["name"]: p["weight"] for p in upstream.get_primary_peers() if not p["down"]}


def ring():
    """The consistent-hash ring (nginx's ketama, as `hash $key consistent`) of this request's
    upstream."""
    name = upstream.current_upstream_name()
    found = rings.get(name)
    if found is None:
        if len(rings) >= MAX_TABLES:
            rings.clear()
        found = rings[name] = chash(live_weights())
    return found


def route_id(peer):
    """The id a backend puts in its route cookie: the first hex digits of md5 of the peer's
    name as written in the upstream (`printf %s 10.0.0.1:80 | md5sum | cut -c1-8`)."""
    return ngx.md5(peer)[:ROUTE_ID_LENGTH]


def route_table():
    """{route id: peer name} of this request's upstream."""
    name = upstream.current_upstream_name()
    table = routes.get(name)
    if table is None:
        if len(routes) >= MAX_TABLES:
            routes.clear()
        table = routes[name] = {route_id(peer): peer for peer in live_weights()}
    return table

# Per-worker tables for hooks/chash_by_header.py and hooks/sticky_cookie.py, built from
# scriptlb.balancers once per worker and peer list. A module on python_package_path runs once
# per worker and keeps its globals, so these caches survive across requests (hook globals do
# not); keying them by the peer list keeps them right across reloads in the same process.

from scriptlb.balancers import chash

MAX_TABLES = 16  # peer lists kept (upstreams x reloads): a bounded cache, never a leak
ROUTE_ID_LENGTH = 8  # hex characters of md5(peer name): stable, short, not the raw address

rings = {}  # ((name, weight), ...) -> chash ring of the peers that are not down
routes = {}  # ((name, weight), ...) -> {route id: peer name}


def signature(peers):
    return tuple((p["name"], p["weight"]) for p in peers if not p["down"])


def ring_for(peers):
    """The consistent-hash ring (nginx's ketama, as `hash $key consistent`) of ``peers``, the
    dicts of upstream.get_primary_peers()."""
    key = signature(peers)
    ring = rings.get(key)
    if ring is None:
        if len(rings) >= MAX_TABLES:
            rings.clear()
        ring = rings[key] = chash(dict(key))
    return ring


def route_id(name):
    """The id a backend puts in its route cookie: the first hex digits of md5 of the peer's
    name as written in the upstream (`printf %s 10.0.0.1:80 | md5sum | cut -c1-8`)."""
    return ngx.md5(name)[:ROUTE_ID_LENGTH]


def routes_for(peers):
    """{route id: peer name} for ``peers``."""
    key = signature(peers)
    table = routes.get(key)
    if table is None:
        if len(routes) >= MAX_TABLES:
            routes.clear()
        table = routes[key] = {route_id(name): name for name, _ in key}
    return table

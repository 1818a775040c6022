# A consistent-hash ring (like nginx's `hash $key consistent`), built once per worker and per
# peer list, then cached in this module's globals: modules on python_package_path are imported
# once per worker, so their globals are the place for worker-level state such as this cache.

import bisect

POINTS_PER_WEIGHT = 40  # virtual nodes per unit of weight

rings = {}  # (peer names and weights) -> (sorted points, owner of each point)


def build(peers):
    points = []
    for peer in peers:
        for i in range(POINTS_PER_WEIGHT * peer["weight"]):
            points.append((ngx.crc32_long(peer["name"] + "-" + str(i)), peer["name"]))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def pick(peers, key):
    """The peer name owning ``key`` on the ring of ``peers`` (dicts from get_primary_peers)."""
    signature = tuple((p["name"], p["weight"]) for p in peers)
    ring = rings.get(signature)
    if ring is None:
        ring = rings[signature] = build(peers)
    hashes, owners = ring
    index = bisect.bisect(hashes, ngx.crc32_long(key)) % len(hashes)
    return owners[index]

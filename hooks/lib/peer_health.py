# Which peers failed recently, per worker: a hook-chosen peer's failures do not count against
# nginx's max_fails (as in OpenResty, the balancer only learns about its own picks), so a hook
# that wants `max_fails=1 fail_timeout=10s` keeps the record itself. Module globals live as long
# as the worker; each worker learns on its own, as nginx's per-worker peer state does.
# (The live statistics do see these failures, across all workers: `last_failure_time` in
# upstream.get_primary_peers(). Reading them costs about 2 us per peer per run; this record
# costs nothing until a peer fails, which is why the sticky hook keeps it.)

FAIL_TIMEOUT = 10  # seconds a failed peer is avoided

failed = {}  # peer name -> ngx.now() of its last failure


def mark_failed(name):
    if len(failed) >= 1024:  # names come from the upstream: this only bounds a misuse
        failed.clear()
    failed[name] = ngx.now()


def is_up(name):
    when = failed.get(name)
    return when is None or ngx.now() - when >= FAIL_TIMEOUT


def failed_peers():
    """Names of the peers that failed within FAIL_TIMEOUT (usually none: an empty dict)."""
    if not failed:
        return []
    now = ngx.now()
    return [name for name, when in failed.items() if now - when < FAIL_TIMEOUT]

"""What running as a system service needs: log directories, systemd readiness, privileges.

- ``make_log_dirs(conf)``: the directories of the pid file and the log files, created when
  missing (nginx refuses to start instead; a fresh checkout or install has no ``logs/``).
- ``notify(text)``: systemd's ``sd_notify`` (``Type=notify`` units): one datagram to
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); nothing without it.
- ``hand_over(conf)`` / ``drop_privileges(conf)``: ``user USER [GROUP]`` for a master started as
  root. The master keeps root (to bind ports and read the config on reload) and gives the
  files workers write (zone directory, access logs) to the user before forking; each worker
  then sets its groups, gid and uid, in that order, before serving a request.
"""

from __future__ import annotations

import os
import socket

from scriptlb.config.model import MainConf
from scriptlb.state.shared_dict import zone_directory

_CONSOLE = ("stderr", "stdout")


def log_paths(conf: MainConf) -> list[str]:
    """Every file the instance logs to: error logs, then every location's access logs."""
    paths = [entry.path for entry in conf.error_log if entry.path not in _CONSOLE and entry.syslog is None]
    if conf.http is not None:
        for server in conf.http.servers:
            for location in server.locations:
                paths.extend(a.path for a in location.access_log if a.path not in _CONSOLE)
    return list(dict.fromkeys(paths))


def make_log_dirs(conf: MainConf) -> None:
    """Create the missing parent directories of the pid file and the log files (best effort:
    a directory that cannot be made shows up as the open() error of the file itself)."""
    paths = log_paths(conf) + ([conf.pid] if conf.pid is not None else [])
    for directory in dict.fromkeys(os.path.dirname(p) for p in paths):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError:
            pass


def notify(text: str) -> bool:
    """Send ``text`` (e.g. ``"READY=1"``) to systemd; False when not under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(text.encode(), target)
    except OSError:
        return False
    return True


def hand_over(conf: MainConf) -> None:
    """Before forking workers that will run as ``conf.user``: give them the zone directory
    and the access-log files they open or create themselves (created here when missing)."""
    if conf.user is None or os.geteuid() != 0:
        return
    uid, gid = conf.user
    directory = zone_directory(conf.prefix)
    os.makedirs(directory, exist_ok=True)
    targets = [directory, *(os.path.join(directory, name) for name in os.listdir(directory))]
    for temp in _body_temp_paths(conf):  # request bodies spilled to files by the workers
        os.makedirs(temp, mode=0o700, exist_ok=True)
        targets.append(temp)
    for path in log_paths(conf):  # error logs too: a worker reopens them on USR1 (as nginx chowns)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        targets.append(path)
    for path in targets:
        os.chown(path, uid, gid)


def _body_temp_paths(conf: MainConf) -> list[str]:
    if conf.http is None:
        return []
    paths = [loc.client_body.temp_path for server in conf.http.servers for loc in server.locations]
    return list(dict.fromkeys(paths))


def drop_privileges(conf: MainConf) -> None:
    """In a worker of a root master: become ``conf.user`` for good (nginx's worker init)."""
    if conf.user is None or os.geteuid() != 0:
        return
    import pwd

    uid, gid = conf.user
    os.setgid(gid)
    try:
        name = pwd.getpwuid(uid).pw_name
        os.initgroups(name, gid)
    except KeyError:
        os.setgroups([gid])
    os.setuid(uid)

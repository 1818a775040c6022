"""The README's promise: `make run` serves conf/scriptlb.conf and curl shows the rotation.

The shipped file is run as a real master + worker process. Its fixed ports (8080, 9001-9003)
are swapped for OS-chosen free ones so the test never collides with a developer's `make run`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import ROOT, scriptlb_cmd
from helpers import free_ports, get

FIXED_PORTS = ("8080", "9001", "9002", "9003")


def _copy_default_conf(prefix: Path) -> tuple[Path, dict[str, int]]:
    text = (ROOT / "conf" / "scriptlb.conf").read_text()
    # ports the scriptlb process binds itself (closed_port() would keep them bound here)
    ports = dict(zip(FIXED_PORTS, free_ports(len(FIXED_PORTS)), strict=True))
    for fixed, port in ports.items():
        text = re.sub(rf"\b{fixed}\b", str(port), text)
    (prefix / "conf").mkdir()
    (prefix / "logs").mkdir()
    conf = prefix / "conf" / "scriptlb.conf"
    conf.write_text(text)
    return conf, ports


def _wait_for(port: int, deadline: float) -> None:
    while True:
        try:
            get(port, "/")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_default_conf_rotates_over_the_three_demo_backends(tmp_path: Path) -> None:
    conf, ports = _copy_default_conf(tmp_path)
    proc = subprocess.Popen(scriptlb_cmd("-p", str(tmp_path), "-c", str(conf)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        balancer = ports["8080"]
        _wait_for(balancer, time.monotonic() + 15)
        bodies = [get(balancer, "/").body.decode() for _ in range(6)]
        backends = [f"backend {ports[p]}\n" for p in ("9001", "9002", "9003")]
        # one worker, smooth round robin over equal weights: a strict rotation
        start = backends.index(bodies[0])
        expected = [backends[(start + i) % 3] for i in range(6)]
        assert bodies == expected
    finally:
        proc.send_signal(signal.SIGQUIT)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    assert b"[emerg]" not in err and b"[alert]" not in err

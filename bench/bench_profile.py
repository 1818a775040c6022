"""Profile a running scriptlb worker with py-spy while wrk loads it; summarize the stacks.

``py-spy record --format raw`` writes one line per distinct stack: ``f1 (file:line);f2 ...;fN
(file:line) COUNT``. ``summarize_raw`` turns that into the top self-time (leaf) and inclusive
entries, per function (line numbers dropped, paths shortened), as percentages of all samples.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

_LINE_NO = re.compile(r":\d+\)$")


def _func(frame: str) -> str:
    frame = _LINE_NO.sub(")", frame.strip())
    # shorten paths: keep what follows site-packages/ or scriptlb/, else the last two components
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    name, path = m.groups()
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/scriptlb/" in "/" + path:  # the package's modules sit in sub-packages: keep them all
        path = "scriptlb/" + ("/" + path).rsplit("/scriptlb/", 1)[1]
    else:
        path = "/".join(path.split("/")[-2:])
    return f"{name} ({path})"


def summarize_raw(text: str, top: int = 30) -> dict:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [_func(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        for fn in set(frames):
            incl_c[fn] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    # frames on (nearly) every stack are the process's entry chain (runpy, cli, master, the
    # worker's run loop): listed apart so the inclusive table shows the request path
    root = {fn for fn, c in incl_c.items() if c >= 0.85 * total and self_c[fn] < 0.5 * total}
    return {
        "samples": total,
        "self": [(100.0 * c / total, fn) for fn, c in self_c.most_common(top)],
        "inclusive": [(100.0 * c / total, fn) for fn, c in incl_c.most_common() if fn not in root][:top],
        "root": sorted(root),
    }


def pyspy_record(pyspy: str, pid: int, seconds: int, out: Path, rate: int = 100,
                 native: bool = True) -> tuple[bool, str]:
    """Record ``pid`` for ``seconds`` into ``out`` (raw format); (ok, message).

    ``native`` adds C frames (uvloop, httptools, libc syscalls such as write/read/epoll_pwait),
    which is where a uvloop proxy spends much of its time; py-spy then has to pause the process
    for each sample (it cannot unwind native stacks with --nonblocking), so the rate is low."""
    argv = [pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
            "--format", "raw", "--output", str(out)]
    argv.append("--native" if native else "--nonblocking")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, "py-spy timed out"
    msg = (p.stdout + p.stderr).strip()
    if p.returncode != 0 or not out.exists():
        return False, f"py-spy failed ({p.returncode}): {msg[-400:]}"
    return True, msg[-200:]

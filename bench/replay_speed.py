"""How fast ``scriptlb replay`` runs: simulated requests per CPU second, for a hook that picks a
peer by the CRC32 of the URI (the target: >= 50,000 per second), on a generated log.

    .venv/bin/python bench/replay_speed.py [--hours 4] [--rate 50] [--hook crc32|hash_by_uri|none]
        [--peer-stats off]

Reports both passes (parsing the log twice, learning the model, replaying) and the replay alone
(the second pass without its parsing), in CPU time (robust when other processes share the CPUs).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_access_log import FORMAT, generate  # noqa: E402

from scriptlb.replay.logs import LineParser, format_template, read_requests  # noqa: E402
from scriptlb.replay.model import Learner, build_models  # noqa: E402
from scriptlb.replay.run import Options, load_conf, replay, replay_one  # noqa: E402

HOOKS = {
    "crc32": """balancer_by_python_block {
            peers = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
            balancer.set_current_peer(peers[ngx.crc32_short(ngx.var.uri) % len(peers)])
        }""",
    "hash_by_uri": f"balancer_by_python_file {ROOT}/hooks/hash_by_uri.py;",
    "none": "",
}
CONF = """events {{}}
http {{
    log_format day '{format}';
    python_peer_stats {peer_stats};
    upstream backend {{
        server 127.0.0.1:9001;
        server 127.0.0.1:9002;
        server 127.0.0.1:9003;
        {hook}
    }}
    server {{ listen 127.0.0.1:8080; location / {{ proxy_pass http://backend; }} }}
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--hook", choices=sorted(HOOKS), default="crc32")
    parser.add_argument("--peer-stats", choices=("on", "off"), default="on",
                        help="python_peer_stats (off: the hook reads no statistics, none are kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "access.log"
        with log.open("w") as out:
            requests = generate(args.hours, args.rate, 7, out)
        conf_file = Path(tmp) / "replay.conf"
        conf_file.write_text(CONF.format(format=FORMAT, hook=HOOKS[args.hook], peer_stats=args.peer_stats))
        started = time.process_time()
        replay(Options(conf=str(conf_file), logs=[str(log)], log_format="day"))
        whole = time.process_time() - started
        # the replay alone: requests parsed beforehand
        conf = load_conf(str(conf_file))
        lines = LineParser(format_template("day", conf))
        parsed = list(read_requests([str(log)], lines))
        learner = Learner(random.Random(1), frozenset())
        for timing in read_requests([str(log)], lines, first_pass=True):
            learner.add(timing.tries, timing.time)
        models, default = build_models(learner.models(), learner.pooled(), None)
        trace = _trace(parsed)
        started = time.process_time()
        replay_one(conf, Options(conf=str(conf_file), logs=[]), lines, trace, models, default, parsed)
        alone = time.process_time() - started
    print(
        f"{requests} requests, hook {args.hook}: {requests / whole:,.0f} simulated requests per CPU second "
        f"from the log file (both passes), {requests / alone:,.0f} for the replay alone"
    )


def _trace(parsed: list) -> object:
    from scriptlb.replay.run import Trace

    times = [r.time - (r.request_time or 0.0) for r in parsed]
    return Trace(requests=len(parsed), first=min(times), last=max(times))


if __name__ == "__main__":
    main()

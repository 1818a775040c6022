"""Write a synthetic access log: a day (or less) of traffic to three peers, in a log_format
that ``scriptlb replay`` reads (``$msec`` times, the per-try ``$upstream_*`` lists).

    .venv/bin/python bench/gen_access_log.py --hours 24 --rate 20 > /tmp/day.log

Requests follow a daily curve (quiet at night, busiest in the afternoon), URIs a Zipf-like
mix, users a header. Peer 9003 is slower than the others and has a bad hour (502s) at noon.
The peers' answers are made up; a replay learns its model from them.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

FORMAT = (
    '$remote_addr [$msec] "$request" $status $request_time "$http_x_user_id" '
    "$upstream_addr $upstream_status $upstream_response_time"
)
PEERS = (("127.0.0.1:9001", 0.020), ("127.0.0.1:9002", 0.025), ("127.0.0.1:9003", 0.060))
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _rate_at(hour: float, peak: float) -> float:
    """Requests per second at this hour of the day: a night low at 04:00, a peak at 16:00."""
    return peak * (0.55 - 0.45 * math.cos((hour - 4.0) / 24 * 2 * math.pi))


def generate(hours: float, peak: float, seed: int, out: object) -> int:
    rng = random.Random(seed)
    uris = [f"/item/{i}" for i in range(2000)]
    weights = [1 / (i + 1) for i in range(len(uris))]
    now = START
    end = START + hours * 3600
    count = 0
    lines = []
    while now < end:
        hour = (now - START) / 3600 % 24
        now += rng.expovariate(max(_rate_at(hour, peak), 0.01))
        uri = rng.choices(uris, weights)[0]
        user = str(rng.randrange(5000))
        name, mean = PEERS[count % 3]
        failing = name.endswith("9003") and 12 <= hour < 13
        status = 502 if failing and rng.random() < 0.5 else 200
        rt = rng.lognormvariate(math.log(mean), 0.5)
        tries = [(name, status, rt)]
        if status == 502:
            other, other_mean = PEERS[(count + 1) % 3]
            tries.append((other, 200, rng.lognormvariate(math.log(other_mean), 0.5)))
        total = sum(t[2] for t in tries)
        lines.append(
            f'10.0.{count % 250}.{count % 200 + 1} [{now + total:.3f}] "GET {uri} HTTP/1.1" 200 {total:.3f} '
            f'"{user}" {", ".join(t[0] for t in tries)} {", ".join(str(t[1]) for t in tries)} '
            f"{', '.join(f'{t[2]:.3f}' for t in tries)}\n"
        )
        count += 1
        if len(lines) >= 10000:
            out.write("".join(lines))  # type: ignore[attr-defined]
            lines = []
    out.write("".join(lines))  # type: ignore[attr-defined]
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--rate", type=float, default=20.0, help="peak requests per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--print-format", action="store_true", help="print the log_format and exit")
    args = parser.parse_args()
    if args.print_format:
        print(FORMAT)
        return
    count = generate(args.hours, args.rate, args.seed, sys.stdout)
    sys.stderr.write(f"{count} requests\n")


if __name__ == "__main__":
    main()

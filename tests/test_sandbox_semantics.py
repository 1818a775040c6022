"""Ordinary code means the same inside the sandbox: each snippet computes ``result`` with plain
Python and under the policy and guards, and the two must be equal (the guards may refuse huge
things, never change small ones)."""

from __future__ import annotations

import textwrap

import pytest
from hook_helpers import run

SNIPPETS = {
    "arithmetic": """
        result = [3 + 4, 2.5 + 1, True + 1, -7 * 3, 3 * 2.5, 2 ** 10, 2 ** -1, (-3) ** 3, 2.0 ** 0.5,
                  7 % 3, -7 % 3, 7.5 % 2, 1 << 10, 5 >> 1, 7 // 2, divmod(17, 5), pow(3, 4, 5),
                  pow(2, -1), round(2.675, 2), round(1234, -2), abs(-3)]
    """,
    "sequence repeat and concat": """
        result = ["ab" * 3, 3 * "ab", [0] * 4, (1, 2) * 2, b"x" * 3, "a" + "b", [1] + [2], (1,) + (2,),
                  "x" * 0, [1] * -1, True * "s"]
    """,
    "augmented assignment keeps aliasing": """
        a = [1]
        b = a
        a += [2]
        a *= 2
        t = (1,)
        u = t
        t += (2,)
        s = "x"
        s += "y"
        n = 5
        n **= 2
        n %= 7
        n <<= 3
        result = [a, b, a is b, t, u, s, n]
    """,
    "percent formatting": """
        result = ["%s|%d|%5.2f|%-6s|%x|%%|%r" % ("a", 42, 3.14159, "left", 255, "q"),
                  "%(name)s is %(age)03d" % {"name": "x", "age": 7}, b"%d-%s" % (5, b"z"), "%c" % 65]
    """,
    "f-strings": """
        x, w = 3.14159, 8
        result = [f"{x:.2f}", f"{x:{w}.3f}", f"{'a'!r}", f"{'é'!a}", f"{42:>{w}}", f"{x=}",
                  f"{'nested ' + f'{1 + 1}'}", f"{{braces}}", f"{[1, 2]!s}", f"{1000000:,}"]
    """,
    "str methods": """
        s = "Hello, World"
        result = [s.lower(), s.split(", "), s.replace("l", "L", 2), s.replace("", "-"), "-".join(["a", "b"]),
                  s.ljust(15, "."), s.rjust(15), s.center(16, "*"), "7".zfill(3), s.startswith(("He", "x")),
                  s.encode("utf-8"), "é".encode("latin-1"), b"\\xe9".decode("latin-1"), s.partition(","),
                  str(b"ab", "ascii"), bytes("hi", "utf-8"), b"-".join([b"a", b"b"]), s.find("o"),
                  "a,b,,c".split(","), "  x ".strip(), s.title(), s.count("l")]
    """,
    "containers": """
        l = [5, 3, 8]
        l.append(1)
        l.extend([9, 2])
        l.sort()
        l[1:3] = [7, 7, 7]
        del l[0]
        d = {"a": 1}
        d["b"] = 2
        d.update(c=3)
        d.setdefault("d", []).append(4)
        s = {1, 2} | {3}
        s.add(4)
        result = [l, sorted(d.items()), sorted(s), {k: v for k, v in d.items() if k != "d"},
                  [x * 2 for x in range(5) if x % 2], list(reversed(l)), sorted("bca"), max(l), min(l),
                  sum(l), sum([0.5, 0.25]), len(d), list(zip("ab", [1, 2])), list(enumerate("xy", 1))]
    """,
    "unpacking and star": """
        a, (b, c), *rest = 1, (2, 3), 4, 5
        def f(*args, **kwargs):
            return args, sorted(kwargs.items())
        first, *middle, last = range(6)
        pairs = [(k, v) for k, v in [("x", 1), ("y", 2)]]
        result = [a, b, c, rest, f(*[1, 2], **{"k": 3}), first, middle, last, pairs, [*"ab", *[1]],
                  (*range(2), 9)]
    """,
    "functions, closures, generators": """
        def counter():
            n = [0]
            def inc():
                n[0] = n[0] + 1
                return n[0]
            return inc
        c = counter()
        c()
        def gen(k):
            for i in range(k):
                yield i * i
            return
        square = lambda x: x * x
        result = [c(), list(gen(4)), sum(i for i in gen(5)), list(map(square, [1, 2, 3])),
                  sorted(["bb", "a", "ccc"], key=len), [f for f in filter(None, [0, 1, 2])]]
    """,
    "control flow": """
        out = []
        for i in range(3):
            if i == 1:
                continue
            out.append(i)
        else:
            out.append("for-else")
        n = 0
        while n < 3:
            n = n + 1
        else:
            out.append("while-else")
        def f():
            try:
                return "try"
            finally:
                out.append("finally")
        def g():
            try:
                1 / 0
            except ZeroDivisionError as e:
                return ("caught", e.args)
        result = [out, f(), g(), out]
    """,
    "modules": """
        import math, json, bisect, heapq, itertools, functools, collections, zlib, hashlib
        h = [5, 1, 4]
        heapq.heapify(h)
        result = [math.sqrt(16), math.factorial(10), math.comb(10, 3), math.perm(5, 2), math.prod([2, 3, 4]),
                  math.lcm(4, 6), math.gcd(12, 18), json.dumps({"b": 1, "a": [1, 2]}, sort_keys=True),
                  json.loads("[1, 2]"), bisect.bisect([1, 3, 5], 4), heapq.heappop(h),
                  list(itertools.product("ab", repeat=2)), list(itertools.permutations([1, 2, 3], 2)),
                  list(itertools.accumulate([1, 2, 3])), list(itertools.accumulate(["a", "b"])),
                  list(itertools.islice(itertools.count(10, 5), 3)), list(itertools.repeat("x", 3)),
                  list(itertools.combinations("abc", 2)), list(itertools.chain([1], [2])),
                  functools.reduce(lambda a, b: a * b, [1, 2, 3, 4]),
                  collections.Counter("abca").most_common(1),
                  sorted(collections.Counter(a=2, b=1).elements()), zlib.crc32(b"x"),
                  hashlib.sha256(b"x").hexdigest(), list(collections.deque([1, 2], maxlen=2))]
    """,
    "isinstance and conversions": """
        result = [isinstance("x", str), isinstance(b"", bytes), isinstance(range(2), range),
                  isinstance(1, (str, int)), int("42"), float("1.5"), str(12), bytes(3), list(range(2, 8, 2)),
                  int("ff", 16), hex(255), bin(5), chr(97), ord("a"), bool([]), tuple("ab"), repr("q")]
    """,
}


def plain(code: str) -> object:
    namespace: dict[str, object] = {}
    exec(code, namespace)  # the same snippet without any sandbox
    return namespace["result"]


@pytest.mark.parametrize("code", SNIPPETS.values(), ids=SNIPPETS.keys())
def test_same_result_in_the_sandbox(code: str) -> None:
    code = textwrap.dedent(code)
    result = run(code + "\nngx.ctx['result'] = result\nbalancer.set_current_peer('127.0.0.1:1')\n",
                 timeout=0.5)
    assert result.kind is None, result.outcome.message
    assert result.ctx["result"] == plain(code)

"""The escape and resource-bomb corpus: each entry asserts how the sandbox ends the attempt.

compile_error: refused by the compiler policy (a config error at load time);
runtime_error: refused while running (the try falls back; the message names the refusal);
timeout:       stopped by the CPU budget (also when hook code catches or swallows the stop);
ok:            harmless (the hook ran and set its peer; nothing outside it changed).

Keep this file in step with RestrictedPython's advisories; re-run it on every upgrade.
"""

from __future__ import annotations

import random
import textwrap
import time

import pytest
from hook_helpers import run

PEER = "\nbalancer.set_current_peer('127.0.0.1:1')\n"

BIG = "s = 'x' * 2**20\nl = [s] * 2**20\n"

COMPILE_ERRORS = {
    "dunder attribute": ("().__class__.__bases__[0].__subclasses__()", 'is an invalid attribute name'),
    "dunder name": ("__import__('os')", '"__import__" is an invalid variable name'),
    "builtins name": ("__builtins__['open']", '"__builtins__" is an invalid variable name'),
    "shadow _getattr_": ("_getattr_ = lambda o, n: 1", '"_getattr_" is an invalid variable name'),
    "shadow _write_ arg": ("def f(_write_):\n    pass", '"_write_" is an invalid variable name'),
    "shadow _getiter_ loop": ("for _getiter_ in []:\n    pass", '"_getiter_" is an invalid variable name'),
    "shadow _tick_ comp": ("[1 for _tick_ in ()]", '"_tick_" is an invalid variable name'),
    # GHSA-ffg3-p8fm-mjx2: positional-only parameters once escaped the name check
    "shadow positional-only": ("def f(_getattr_, /):\n    return 1",
                               '"_getattr_" is an invalid variable name'),
    "shadow keyword-only": ("def f(*, _write_=None):\n    return 1", '"_write_" is an invalid variable name'),
    "shadow varargs": ("def f(*_getitem_):\n    return 1", '"_getitem_" is an invalid variable name'),
    "shadow kwargs": ("def f(**_apply_):\n    return 1", '"_apply_" is an invalid variable name'),
    "shadow lambda param": ("f = lambda _tick_: 1", '"_tick_" is an invalid variable name'),
    "shadow walrus": ("(_getattr_ := 1)", '"_getattr_" is an invalid variable name'),
    "shadow import as": ("import math as _getattr_", '"_getattr_" is an invalid variable name'),
    "shadow except as": ("try:\n    pass\nexcept Exception as _write_:\n    pass",
                         '"_write_" is an invalid variable name'),
    "shadow global": ("def f():\n    global _inplacevar_\n    _inplacevar_ = 1",
                      '"_inplacevar_" is an invalid variable name'),
    "import private": ("from math import _x", '"_x" is an invalid variable name'),
    "star import": ("from math import *", '"*" imports are not allowed'),
    "try except*": ("try:\n    pass\nexcept* ValueError:\n    pass", "TryStar statements are not allowed"),
    "class keyword": ("class A(metaclass=1):\n    pass", "class keywords"),
    "dunder method": ("def __init__(self):\n    pass", '"__init__" is an invalid variable name'),
    "async def": ("async def f():\n    pass", "AsyncFunctionDef statements are not allowed"),
    "exec": ("exec('1')", "Exec calls are not allowed"),
    "eval": ("eval('1')", "Eval calls are not allowed"),
    "traceback": ("try:\n    1/0\nexcept Exception as e:\n    e.__traceback__",
                  '"__traceback__" is an invalid attribute'),
    "gi_frame": ("def g():\n    yield 1\ng().gi_frame", '"gi_frame" is a restricted name'),
    "gi_code": ("def g():\n    yield 1\ng().gi_code", '"gi_code" is a restricted name'),
    "tb_frame": ("x = None\nx.tb_frame", '"tb_frame" is a restricted name'),
    "f_back": ("x = None\nx.f_back", '"f_back" is a restricted name'),
    "f_globals": ("x = None\nx.f_globals", '"f_globals" is a restricted name'),
    "match class pattern": ("match 1:\n    case int(real=r):\n        pass", "statements are not allowed"),
    "nonlocal": ("def f():\n    x = 1\n    def g():\n        nonlocal x\n",
                 "Nonlocal statements are not allowed"),
    "syntax": ("x = (", "SyntaxError: '(' was never closed"),
    "too deep for the compiler": ("x = " + "+".join(["1"] * 100_000),
                                  "RecursionError: maximum recursion depth"),
    "breakpoint": ("x = breakpoint", '"breakpoint" is a reserved name'),
    "import builtins": ("import builtins", '"builtins" is a reserved name'),
}


@pytest.mark.parametrize(("code", "message"), COMPILE_ERRORS.values(), ids=COMPILE_ERRORS.keys())
def test_compile_errors(code: str, message: str) -> None:
    result = run(code)
    assert result.kind == "compile_error"
    assert message in result.outcome.message
    assert result.outcome.addr is None


RUNTIME_ERRORS = {
    # reaching type objects, frames and globals through builtins that are not there
    "type()": ("type(1)", "NameError: name 'type' is not defined"),
    "vars()": ("vars()", "NameError: name 'vars' is not defined"),
    "globals()": ("globals()", "NameError: name 'globals' is not defined"),
    "locals()": ("locals()", "NameError: name 'locals' is not defined"),
    "dir()": ("dir()", "NameError: name 'dir' is not defined"),
    "open()": ("open('/etc/passwd')", "NameError: name 'open' is not defined"),
    "compile()": ("compile('1', 'x', 'exec')", "NameError: name 'compile' is not defined"),
    "setattr()": ("setattr(ngx, 'ctx', {})", "NameError: name 'setattr' is not defined"),
    "object": ("object", "NameError: name 'object' is not defined"),
    "BaseException": ("BaseException", "NameError: name 'BaseException' is not defined"),
    "id()": ("id(1)", "NameError: name 'id' is not defined"),
    "memoryview": ("memoryview(b'x')", "NameError: name 'memoryview' is not defined"),
    # attribute walking at run time (names the compiler cannot see)
    "getattr dunder": ("getattr((), '__class__')",
                       "AttributeError: 'tuple' object has no attribute '__class__'"),
    "getattr default": ("getattr(ngx, '__dict__', None).keys()", "'NoneType' object has no attribute 'keys'"),
    "getattr gi_frame": ("def g():\n    yield 1\ngetattr(g(), 'gi_frame')", "no attribute 'gi_frame'"),
    "getattr func globals": ("def f():\n    pass\ngetattr(f, 'func_globals')", "no attribute 'func_globals'"),
    "getattr traceback": ("try:\n    1/0\nexcept ZeroDivisionError as e:\n    getattr(e, '__traceback__')",
                          "no attribute '__traceback__'"),
    "with_traceback": ("try:\n    1/0\nexcept ZeroDivisionError as e:\n    e.with_traceback(None)",
                       "'ZeroDivisionError' object has no attribute 'with_traceback'"),
    "AttributeError.obj": ("try:\n    [].nope\nexcept AttributeError as e:\n    e.obj",
                           "'AttributeError' object has no attribute 'obj'"),
    "AttributeError.name": ("try:\n    ngx.nope\nexcept AttributeError as e:\n    e.name",
                            "'AttributeError' object has no attribute 'name'"),
    "builtin __self__": ("getattr(len, '__self__')", "no attribute '__self__'"),
    "bound method self": ("[].append.__self__", None),  # compile-time; see COMPILE_ERRORS
    "unbound str method": ("str.join(',', ['a'])", "'function' object has no attribute 'join'"),
    "unbound list method": ("list.append([], 1)", "'function' object has no attribute 'append'"),
    # codecs written in Python (punycode is quadratic) would run unticked inside one call
    "encode punycode": ("('\\xe9' * 10**5).encode('punycode')",
                        "encoding 'punycode' is not allowed in hooks"),
    "decode rot13": ("b'x'.decode('rot13')", "encoding 'rot13' is not allowed in hooks"),
    "str() codec": ("str(b'x', 'idna')", "encoding 'idna' is not allowed in hooks"),
    "bytes() codec": ("bytes('x', encoding='punycode')", "encoding 'punycode' is not allowed in hooks"),
    "codec error handler": ("'\\xe9'.encode('ascii', 'namereplace')",
                            "error handler 'namereplace' is not allowed"),
    "str.format": ("'{0.__class__}'.format(1)", "'str' object has no attribute 'format'"),
    "str.format_map": ("'{x.real}'.format_map({'x': 1})", "'str' object has no attribute 'format_map'"),
    "format spec attr": ("format(1, '{0.__class__}')", "Invalid format specifier"),
    "api internals": ("balancer.__class__", None),
    "api private via getattr": ("getattr(balancer, '_current')", "no attribute '_current'"),
    "ngx.var write": ("ngx.var.uri = '/'", "TypeError: a hook cannot modify a 'VarView' object"),
    "ngx attribute write": ("ngx.ctx = {}", "TypeError: a hook cannot modify a 'Ngx' object"),
    # ngx/balancer/upstream attribute reads skip _getattr_ only while those names are never rebound
    "rebound api name (param)": ("def g():\n    yield 1\ndef f(ngx):\n    return ngx.gi_running\nf(g())",
                                 "'generator' object has no attribute 'gi_running' visible to hooks"),
    "rebound api name (global)": ("def g():\n    yield 1\nupstream = g()\nupstream.gi_running",
                                  "'generator' object has no attribute 'gi_running' visible to hooks"),
    "iterate ngx.shared": ("list(ngx.shared)", "'SharedView' object is not iterable"),
    "iterate ngx.var": ("a, b = ngx.var", "'VarView' object is not iterable"),
    "api method write": ("balancer.set_current_peer = None", "a hook cannot modify a 'NgxBalancer' object"),
    "function attribute write": ("def f():\n    pass\nf.x = 1", "a hook cannot modify a 'function' object"),
    # imports
    "import os": ("import os", "No module named 'os'"),
    "import sys": ("import sys", "No module named 'sys'"),
    "import struct": ("import struct", "No module named 'struct'"),
    "import re": ("import re", "No module named 're'"),
    "import importlib": ("import importlib", "No module named 'importlib'"),
    "import ctypes": ("import ctypes", "No module named 'ctypes'"),
    "import gc": ("import gc", "No module named 'gc'"),
    "import inspect": ("import inspect", "No module named 'inspect'"),
    "from os import path": ("from os import path", "No module named 'os'"),
    "relative import": ("from . import x", "relative imports are not allowed"),
    "math write": ("import math\nmath.sqrt = None", "TypeError: a hook cannot modify a 'SafeModule' object"),
    "math delete": ("import math\ndel math.pi", "TypeError: a hook cannot modify a 'SafeModule' object"),
    "math private": ("import math\ngetattr(math, '_members')", "no attribute '_members'"),
    "from math private via getattr": ("from math import sqrt\ngetattr(sqrt, '__self__')", "no attribute"),
    "hashlib.pbkdf2_hmac": ("import hashlib\nhashlib.pbkdf2_hmac", "no attribute 'pbkdf2_hmac'"),
    "hashlib.new": ("import hashlib\nhashlib.new('md5')", "no attribute 'new'"),
    "zlib.decompress": ("import zlib\nzlib.decompress(b'')", "no attribute 'decompress'"),
    "time.sleep": ("import time\ntime.sleep(1)", "no attribute 'sleep'"),
    "collections.ChainMap": ("import collections\ncollections.ChainMap", "no attribute 'ChainMap'"),
    "iter sentinel": ("iter(lambda: 1, 2)", "takes 1 positional argument"),
    # resource bombs refused up front (one C call each: a tick could not stop them)
    "str repeat": ("'x' * 10**10", "SandboxLimitError: size of 10000000000"),
    "list repeat": ("[0] * 10**10", "SandboxLimitError: size of 10000000000"),
    "tuple repeat reversed": ("10**9 * (1,)", "SandboxLimitError: size of 1000000000"),
    "bytes repeat": ("b'x' * 10**10", "SandboxLimitError: size of"),
    "power tower": ("10**10**8", "SandboxLimitError: int size in bits"),
    "pow()": ("pow(10, 10**8)", "SandboxLimitError: int size in bits"),
    "pow() mod": ("pow(3, 1 << 5000, 7)", "SandboxLimitError: pow() argument size in bits"),
    "big product": ("(10**4000) * (10**4000)", "SandboxLimitError: int size in bits"),
    "shift": ("1 << 10**9", "SandboxLimitError: int size in bits"),
    "percent width": ("'%0999999999d' % 1", "SandboxLimitError: format width of 999999999"),
    "percent precision": ("'%.999999999f' % 1.0", "SandboxLimitError: format width of 999999999"),
    "percent star": ("'%*d' % (10**9, 1)", "'*' widths are not allowed"),
    "percent bytes": ("b'%0999999999d' % 1", "SandboxLimitError: format width"),
    "format()": ("format(1, '0999999999')", "SandboxLimitError: format width"),
    "f-string width": ("f'{1:0999999999}'", "SandboxLimitError: format width"),
    "f-string nested width": ("w = 10**9\nf'{1:{w}}'", "SandboxLimitError: format width"),
    "sum of huge range": ("sum(range(10**15))", "SandboxLimitError: range() length"),
    "list of huge range": ("list(range(10**12))", "SandboxLimitError: range() length"),
    "range over sys.maxsize": ("range(10**30)", "SandboxLimitError: range() length"),
    "factorial": ("import math\nmath.factorial(10**7)", "SandboxLimitError: factorial() argument"),
    "comb": ("import math\nmath.comb(10**6, 5 * 10**5)", "SandboxLimitError: comb() result size"),
    "perm": ("import math\nmath.perm(10**5)", "SandboxLimitError: perm() result size"),
    "prod": ("import math\nmath.prod(range(1, 10**5))", "SandboxLimitError: int size in bits"),
    "lcm": ("import math\nmath.lcm(2**16000, 3**2000)", "SandboxLimitError: lcm() result size"),
    "ljust": ("'x'.ljust(10**10)", "SandboxLimitError: ljust() width"),
    "center": ("'x'.center(10**10)", "SandboxLimitError: center() width"),
    "zfill": ("'1'.zfill(10**10)", "SandboxLimitError: zfill() width"),
    "replace": ("('x' * 1000).replace('', 'y' * 10000)", "SandboxLimitError: replace() result size"),
    "join": ("s = 'x' * 2**20\n''.join([s, s])", "SandboxLimitError: joined size"),
    "expandtabs": ("'\\t'.expandtabs(10**9)", "has no attribute 'expandtabs'"),
    "translate": ("'a'.translate({97: 'b' * 10**6})", "has no attribute 'translate'"),
    "add doubling": ("s = 'x' * 2**19\nfor i in range(40):\n    s = s + s",
                     "SandboxLimitError: size of 2097152"),
    "straight-line doubling": ("s = 'x' * 2**20\ns = s + s\ns = s + s", "SandboxLimitError: size of"),
    "f-string doubling": ("s = 'x' * 2**20\ns = f'{s}{s}'", "SandboxLimitError: size of"),
    "star doubling": ("l = [0] * 2**20\nl = [*l, *l]", "SandboxLimitError: size of"),
    "extend doubling": ("l = [0] * 2**20\nl.extend(l)", "SandboxLimitError: size of"),
    "iadd doubling": ("l = [0] * 2**20\nl += l", "SandboxLimitError: size of"),
    "imul": ("l = [0]\nl *= 10**9", "SandboxLimitError: size of"),
    "slice doubling": ("l = [0] * 2**20\nl[0:0] = l", "SandboxLimitError: list size"),
    # a small container with a terabyte of text: [s] * 2**20 for a 1 MiB s
    "str of shared refs": (BIG + "str(l)", "SandboxLimitError: text size (estimated)"),
    "repr of shared refs": (BIG + "repr(l)", "SandboxLimitError: text size (estimated)"),
    "ascii of shared refs": (BIG + "ascii(l)", "SandboxLimitError: text size (estimated)"),
    "f-string of shared refs": (BIG + "x = f'{l}'", "SandboxLimitError: text size (estimated)"),
    "f-string !r of shared refs": (BIG + "x = f'{l!r:>5}'", "SandboxLimitError: text size (estimated)"),
    "format of shared refs": (BIG + "format(l)", "SandboxLimitError: text size (estimated)"),
    "percent tuple of shared refs": (BIG + "'%s' % (l,)", "SandboxLimitError: text size (estimated)"),
    "percent list of shared refs": (BIG + "'%s' % l", "SandboxLimitError: text size (estimated)"),
    "percent dict of shared refs": (BIG + "'%(a)s' % {'a': l}", "SandboxLimitError: text size (estimated)"),
    "json of shared refs": (BIG + "import json\njson.dumps(l)", "SandboxLimitError: text size (estimated)"),
    "dict of shared refs": ("d = dict.fromkeys(range(99999), 'x' * 2**20)\nstr(d)",
                            "SandboxLimitError: text size (estimated)"),
    "exception of shared refs": (BIG + "str(KeyError(tuple(l)))", "SandboxLimitError: text size (estimated)"),
    "cyclic list": ("l = [1]\nl.append(l)\nstr(l)", "SandboxLimitError: text size (estimated)"),
    # a key with megabytes of text: the KeyError's message stays bounded
    "missing huge key": ("{}[('x' * 2**20,) * 10]", "KeyError: ('xxxx"),
    "bytes(n)": ("bytes(10**10)", "SandboxLimitError: bytes() length"),
    "to_bytes": ("(1).to_bytes(10**10, 'big')", "SandboxLimitError: to_bytes() length"),
    "int digits": ("int('9' * 5000)", "ValueError: Exceeds the limit (4300 digits)"),
    "json indent": ("import json\njson.dumps([1], indent=10**9)", "SandboxLimitError: json.dumps() indent"),
    "choices": ("import random\nrandom.choices([1], k=10**9)", "SandboxLimitError: choices() k"),
    "getrandbits": ("import random\nrandom.getrandbits(10**9)", "SandboxLimitError: getrandbits() bits"),
    "randbytes": ("import random\nrandom.randbytes(10**10)", "SandboxLimitError: randbytes() length"),
    "product repeat": ("import itertools\nitertools.product([1, 2], repeat=10**9)",
                       "SandboxLimitError: product() repeat"),
    "set union of shared refs": ("l = list(range(99999))\nset().union(*[l] * 1000)",
                                 "SandboxLimitError: union() input size"),
    "set update of shared refs": ("l = list(range(99999))\ns = set()\ns.update(*[l] * 100)",
                                  "SandboxLimitError: update() input size"),
    "tee n": ("import itertools\nitertools.tee([1], 10**9)", "SandboxLimitError: tee() n"),
    "round digits": ("round(1, -10**8)", "SandboxLimitError: round() ndigits"),
    "sum of lists": ("sum([[1], [2]], [])", "sum() in a hook adds numbers only"),
    # recursion is bounded by the interpreter's limit: a RecursionError is an ordinary error
    "deep recursion": ("def f():\n    return f()\nf()", "RecursionError: maximum recursion depth exceeded"),
}
RUNTIME_ERRORS = {k: v for k, v in RUNTIME_ERRORS.items() if v[1] is not None}


@pytest.mark.parametrize(("code", "message"), RUNTIME_ERRORS.values(), ids=RUNTIME_ERRORS.keys())
def test_runtime_errors(code: str, message: str) -> None:
    started = time.perf_counter()
    result = run(code + PEER)
    assert result.kind == "runtime_error", result.outcome.message
    assert message in result.outcome.message
    assert result.outcome.addr is None  # the peer set after the refusal never happened
    assert time.perf_counter() - started < 1.0  # refused up front, not after the work


TIMEOUTS = {
    "busy loop": "while True:\n    pass",
    "bare except swallows": ("while True:\n    try:\n        while True:\n            pass\n"
                             "    except:\n        pass"),
    "except BaseException": "try:\n    while True:\n        pass\nexcept BaseException:\n    pass",
    "finally return": ("def f():\n    try:\n        while True:\n            pass\n    finally:\n"
                       "        return 1\nx = f()"),
    "finally return in loop": ("def f():\n    try:\n        while True:\n            pass\n    finally:\n"
                               "        return 1\nwhile True:\n    f()"),
    "finally continue": ("while True:\n    try:\n        while True:\n            pass\n"
                         "    finally:\n        continue"),
    "except then proceed": "try:\n    while True:\n        pass\nexcept:\n    x = 1",
    "generator finally": ("def g():\n    try:\n        yield 1\n    finally:\n"
                          "        while True:\n            pass\nfor x in g():\n    break"),
    "generator swallows close": ("def g():\n    while True:\n        try:\n            yield 1\n"
                                 "        except:\n            pass\nfor x in g():\n    pass"),
    "exponential recursion": "def f(n):\n    return 0 if n == 0 else f(n - 1) + f(n - 1)\nf(60)",
    "recursion retry": ("def f():\n    try:\n        f()\n    except RecursionError:\n        f()\nf()"),
    "count loop": "import itertools\nfor x in itertools.count():\n    pass",
    "list(count())": "import itertools\nlist(itertools.count())",
    "sum(repeat())": "import itertools\nsum(itertools.repeat(1))",
    "max(cycle())": "import itertools\nmax(itertools.cycle([1]))",
    "sorted(count())": "import itertools\nsorted(itertools.count())",
    "join(repeat())": "import itertools\n''.join(itertools.repeat('x'))",
    "comprehension": "import itertools\n[x for x in itertools.count()]",
    "generator expression in C": "import itertools\nany(x < 0 for x in itertools.count())",
    "reduce": "import functools, itertools\nfunctools.reduce(lambda a, b: a, itertools.count())",
    "map lambda": "import itertools\nlist(map(lambda x: x, itertools.count()))",
    "Counter.elements": "import collections\nlist(collections.Counter(a=10**12).elements())",
    "permutations": "import itertools\nlist(itertools.permutations(range(100)))",
    "accumulate": "import itertools\nlist(itertools.accumulate(itertools.repeat('x')))",
    "while with call": "def f():\n    return True\nwhile f():\n    pass",
    # a key whose hash/comparison would walk 2**36 elements: stopped before hashing (walking its
    # million top-level items alone would outlast the budget)
    "missing key of shared refs": BIG + "{}[tuple(l)]",
    # C iterators over shared references: a billion items from a few small objects
    "zip of shared refs": "l = [0] * 2**20\nx = list(zip(*[l] * 1000))",
    "chain of shared refs": "import itertools\nl = [0] * 2**20\nx = max(itertools.chain(*[l] * 1000))",
    "map of shared refs": "l = [0] * 2**20\nx = sum(map(max, *([l] * 1000)))",
    "enumerate in C": "l = [0] * 2**20\nx = dict(enumerate(l))\nwhile True:\n    pass",
}


# A generator closed while being deallocated reports the stop as "Exception ignored" (CPython
# cannot propagate from a destructor); the run still ends as a timeout, which is what counts.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("code", TIMEOUTS.values(), ids=TIMEOUTS.keys())
def test_timeouts(code: str) -> None:
    started = time.perf_counter()
    result = run(code + PEER, timeout=0.02)
    elapsed = time.perf_counter() - started
    assert result.kind == "timeout", result.outcome.message
    assert result.outcome.message.startswith("balancer_by_python timed out after 20ms at ")
    assert result.outcome.addr is None
    assert elapsed < 1.0


HARMLESS = {
    "own random seed": "import random\nrandom.seed(1)\nx = random.random()",
    "math": "import math\nx = math.sqrt(16) + math.factorial(20) + math.comb(50, 25)",
    "formats": "x = f'{1.5:.3f}|{7:05d}|{\"a\"!r:>4}' + '%05d|%s' % (42, 'y') + format(3, 'x')",
    "getattr public": "x = getattr(1, 'real') + getattr([], 'nope', 5)",
    "exception args": "try:\n    1/0\nexcept ZeroDivisionError as e:\n    x = e.args",
    "hashlib": "import hashlib\nh = hashlib.sha256(b'x')\nh.update(b'y')\nx = h.hexdigest()",
    "json": "import json\nx = json.loads(json.dumps({'a': [1, 2]}, sort_keys=True))",
    "collections": ("import collections\nd = collections.deque([1], maxlen=3)\nd.extend([2, 3, 4])\n"
                    "c = collections.Counter('hello').most_common(1)"),
    "itertools bounded": "import itertools\nx = list(itertools.islice(itertools.count(), 5))",
    "lru_cache": ("import functools\n@functools.lru_cache(maxsize=8)\ndef f(n):\n    return n * 2\n"
                  "f(1)\nx = f.cache_info().hits"),
    "pow mod": "x = pow(2, 10**9, 10**9 + 7)",
    "big but allowed": "x = 'x' * 2**20\ny = len(x.split('x'))",
    "unpacking": "a, (b, c) = 1, (2, 3)\nfor k, v in {'a': 1}.items():\n    pass",
    "dict class attr": "x = dict.fromkeys(['a'], 0)",
    "ticking builtins": ("x = dict(zip('ab', map(len, ['x', 'yy'])))\n"
                         "y = list(enumerate(filter(None, [0, 1]), 1))\n"
                         "z = {1, 2}.union([3], (4,)) | frozenset([5]).union([6])"),
    "log and print of shared refs": BIG + "ngx.log(ngx.ERR, l)\nprint(*l)\nngx.log(ngx.ERR, *l)",
    "small containers print in full": "x = str([1, 'a', (2.5, None)]) + f'{ {1: 2} }' + '%s' % ([3],)",
    "isinstance with guarded types": ("assert isinstance('x', str) and isinstance(b'', (bytes, int))\n"
                                      "assert isinstance(range(3), range)\n"
                                      "assert not isinstance(1, (str, list))"),
    "safe codecs": ("x = 'é'.encode('utf-8').decode('latin-1') + str(b'a', 'ascii')\n"
                    "y = str(bytes('b', 'utf-16'), 'utf-16', 'strict')"),
}


@pytest.mark.parametrize("code", HARMLESS.values(), ids=HARMLESS.keys())
def test_harmless(code: str) -> None:
    state = random.getstate()
    result = run(code + PEER, timeout=0.05)
    assert result.kind is None, result.outcome.message
    assert result.outcome.addr is not None
    assert random.getstate() == state  # the process-wide generator was not touched
    assert all(len(message) < 2200 for _, message in result.logs)  # logs are cut, never huge


def test_random_is_per_hook() -> None:
    """Reseeding one hook's generator does not change another hook's sequence."""
    from hook_helpers import exchange, runner

    code = "import random\nrandom.seed(7)\nngx.ctx['r'] = random.random()" + PEER
    first, second = runner(code), runner("import random\nngx.ctx['r'] = random.random()" + PEER)
    ex1, ex2 = exchange(), exchange()
    first.run(ex1, first.upstream)
    second.run(ex2, second.upstream)
    assert ex1.ctx["r"] == random.Random(7).random()
    assert ex2.ctx["r"] != ex1.ctx["r"]


def test_stopped_hook_code_resumed_later_is_stopped_again() -> None:
    """A generator created in one run and finalized outside it cannot run unbounded work."""
    code = textwrap.dedent("""
        def g():
            try:
                yield 1
            finally:
                while True:
                    pass
        it = g()
        next(it)
        ngx.ctx["gen"] = it
    """) + PEER
    result = run(code)
    assert result.kind is None
    gen = result.ctx.pop("gen")
    from scriptlb.sandbox.limits import HookTimeout

    with pytest.raises(HookTimeout):
        gen.close()  # outside any run: the first tick stops it

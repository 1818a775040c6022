"""Read-only stand-ins for the standard modules a hook may import.

``import math`` in a hook returns a ``SafeModule``, never the real module: its members are a
fixed table (so ``math.sqrt = ...`` or ``random.seed`` on the process-wide generator cannot
happen), and members that could run unbounded inside one C call are replaced by checked
versions: capped ``factorial``/``comb``/``perm``/``prod``/``lcm``, infinite or combinatorial
``itertools`` iterators that tick the CPU budget per item, ``json.dumps`` without huge indents,
``zlib`` checksums only, ``hashlib`` plain digests only, ``time`` clocks only.
"""

from __future__ import annotations

import base64
import bisect
import collections
import functools
import hashlib
import heapq
import itertools
import json
import math
import operator
import random
import string
import time
import zlib
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from scriptlb.balancing import resty as balancers
from scriptlb.sandbox import guards, limits
from scriptlb.sandbox.guards import (
    REAL_TYPES,
    check_text,
    check_work,
    checked_key,
    checking,
    expose,
    expose_checked,
    expose_dynamic,
    guarded_add,
    guarded_mul,
    ticking,
    ticking_factory,
    too_big,
)
from scriptlb.sandbox.limits import MAX_INT_BITS, MAX_ITEMS, MAX_REPEAT


class SafeModule:
    """A module stand-in: a name and a read-only table of members.

    The table is also the instance's ``__dict__``, so ``math.sqrt`` compiled as a plain
    attribute read (policy.py: a name only ever bound by ``import``) finds the member in C;
    hook code cannot reach the table (``__dict__`` is a private name, setting is refused) and
    the class defines no public name that could shadow a member."""

    __slots__ = ("__dict__", "_members", "_name")

    def __init__(self, name: str, members: dict[str, Any]) -> None:
        table = dict(members)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_members", table)
        object.__setattr__(self, "__dict__", table)

    def __getattr__(self, name: str) -> Any:  # also serves `from math import sqrt`
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._members[name]
        except KeyError:
            raise AttributeError(f"module '{self._name}' has no attribute '{name}' visible to hooks")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"module '{self._name}' is read-only in hooks")

    def __delattr__(self, name: str) -> None:
        raise TypeError(f"module '{self._name}' is read-only in hooks")

    def __repr__(self) -> str:
        return f"<module '{self._name}' (sandboxed)>"


def _member(module: SafeModule, name: str) -> Any:
    """``math.sqrt`` in hooks: straight to the member table (no failed lookup first)."""
    try:
        return module._members[name]
    except KeyError:
        raise AttributeError(f"module '{module._name}' has no attribute '{name}' visible to hooks") from None


expose_dynamic(SafeModule, _member)


def _pick(module: Any, names: str) -> dict[str, Any]:
    return {name: getattr(module, name) for name in names.split()}


# --------------------------------------------------------------------------- math


def _bits_of_log2(value: float) -> int:
    return int(value) + 1


def _factorial(n: int) -> int:
    if isinstance(n, int) and n > 1000:
        raise too_big("factorial() argument", n, 1000)
    return math.factorial(n)


def _log2_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _comb(n: int, k: int) -> int:
    if isinstance(n, int) and isinstance(k, int) and 0 <= k <= n and _log2_comb(n, k) > MAX_INT_BITS:
        raise too_big("comb() result size in bits", _bits_of_log2(_log2_comb(n, k)), MAX_INT_BITS)
    return math.comb(n, k)


def _perm(n: int, k: int | None = None) -> int:
    k = n if k is None else k
    if isinstance(n, int) and isinstance(k, int) and 0 <= k <= n:
        bits = (math.lgamma(n + 1) - math.lgamma(n - k + 1)) / math.log(2)
        if bits > MAX_INT_BITS:
            raise too_big("perm() result size in bits", _bits_of_log2(bits), MAX_INT_BITS)
    return math.perm(n, k)


def _prod(iterable: Iterable[Any], /, *, start: Any = 1) -> Any:
    result = start
    for item in iterable:
        limits.tick()
        result = guarded_mul(result, item)
    return result


def _lcm(*integers: int) -> int:
    result = 1
    for n in integers:
        limits.tick()
        result = math.lcm(result, n)
        if result.bit_length() > MAX_INT_BITS:
            raise too_big("lcm() result size in bits", result.bit_length(), MAX_INT_BITS)
    return result


_MATH = _pick(math, "acos acosh asin asinh atan atan2 atanh ceil copysign cos cosh degrees dist e erf "
                    "erfc exp expm1 fabs floor fmod frexp fsum gamma gcd hypot inf isclose isfinite isinf "
                    "isnan isqrt ldexp lgamma log log10 log1p log2 modf nan nextafter pi pow radians "
                    "remainder sin sinh sqrt tan tanh tau trunc ulp cbrt exp2")
_MATH.update(factorial=_factorial, comb=_comb, perm=_perm, prod=_prod, lcm=_lcm)


# --------------------------------------------------------------------------- random


def _random_module() -> SafeModule:
    """A generator of its own per importer: reseeding it cannot affect anyone else."""
    rng = random.Random()

    def choices(population: Any, weights: Any = None, *, cum_weights: Any = None, k: int = 1) -> list[Any]:
        if k > MAX_ITEMS:
            raise too_big("choices() k", k, MAX_ITEMS)
        return rng.choices(population, weights, cum_weights=cum_weights, k=k)

    def getrandbits(k: int) -> int:
        if k > MAX_INT_BITS:
            raise too_big("getrandbits() bits", k, MAX_INT_BITS)
        return rng.getrandbits(k)

    def randbytes(n: int) -> bytes:
        if n > limits.MAX_STR:
            raise too_big("randbytes() length", n, limits.MAX_STR)
        return rng.randbytes(n)

    def sample(population: Any, k: int, *, counts: Any = None) -> list[Any]:
        if counts is not None:
            raise TypeError("sample() counts are not supported in hooks")
        return rng.sample(population, k)

    members = {name: getattr(rng, name) for name in ["random", "uniform", "randint", "randrange", "choice",
                                                     "shuffle", "seed", "gauss", "normalvariate",
                                                     "expovariate", "betavariate", "triangular",
                                                     "lognormvariate", "vonmisesvariate", "gammavariate",
                                                     "paretovariate", "weibullvariate"]}
    members.update(choices=choices, getrandbits=getrandbits, randbytes=randbytes, sample=sample)
    return SafeModule("random", members)


# --------------------------------------------------------------------------- itertools


def _product(*iterables: Iterable[Any], repeat: int = 1) -> Iterator[Any]:
    if repeat > MAX_REPEAT:
        raise too_big("product() repeat", repeat, MAX_REPEAT)
    return ticking(itertools.product(*iterables, repeat=repeat))


def _accumulate(iterable: Iterable[Any], func: Callable[[Any, Any], Any] | None = None, *,
                initial: Any = None) -> Iterator[Any]:
    # the default operator.add would grow strings/lists quadratically without any check
    return ticking(itertools.accumulate(iterable, func or guarded_add, initial=initial))


def _tee(iterable: Iterable[Any], n: int = 2) -> tuple[Iterator[Any], ...]:
    if isinstance(n, int) and n > MAX_REPEAT:  # tee(x, 10**9) builds a billion iterators at once
        raise too_big("tee() n", n, MAX_REPEAT)
    return itertools.tee(iterable, n)


_ITERTOOLS: dict[str, Callable[..., object]] = {name: ticking_factory(getattr(itertools, name)) for name in (
    "chain", "compress", "dropwhile", "filterfalse", "groupby", "islice", "pairwise", "starmap", "takewhile",
    "zip_longest")}  # C iterators: their output can dwarf their input (chain(*[big] * 1000))
_ITERTOOLS["tee"] = _tee
_ITERTOOLS.update({name: ticking_factory(getattr(itertools, name)) for name in (
    "count", "cycle", "repeat", "permutations", "combinations", "combinations_with_replacement")})
_ITERTOOLS.update(product=_product, accumulate=_accumulate)


# --------------------------------------------------------------------------- others


def _dumps(obj: Any, *, indent: Any = None, separators: Any = None, sort_keys: bool = False,
           ensure_ascii: bool = True, default: Any = None) -> str:
    if (isinstance(indent, int) and indent > 16) or (isinstance(indent, str) and len(indent) > 16):
        raise too_big("json.dumps() indent", indent if isinstance(indent, int) else len(indent), 16)
    check_text(obj)
    text = json.dumps(obj, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii, default=default)
    if len(text) > limits.MAX_STR:
        raise too_big("json.dumps() result size", len(text), limits.MAX_STR)
    return text


def _loads(text: str | bytes, *, object_hook: Any = None, object_pairs_hook: Any = None,
           parse_float: Any = None, parse_int: Any = None, parse_constant: Any = None) -> Any:
    """json.loads with its hooks: they are called from C once per decoded value, so the work is
    bounded by the text (capped) and each hook function checks the budget. No ``cls=``."""
    if isinstance(text, (str, bytes)) and len(text) > limits.MAX_STR:
        raise too_big("json.loads() text size", len(text), limits.MAX_STR)
    return json.loads(text, object_hook=object_hook, object_pairs_hook=object_pairs_hook,
                      parse_float=parse_float, parse_int=parse_int, parse_constant=parse_constant)


# --------------------------------------------------------------------------- namedtuple

MAX_FIELDS = 64
MAX_NAMEDTUPLES = 256  # distinct classes per process: a hook's top level runs on every try
_NAMEDTUPLES: dict[tuple[Any, ...], type] = {}
# called by another name: mypy reads a direct namedtuple() call as a class definition, which
# needs literal arguments; here the name and fields are the hook's (checked above)
_make_namedtuple: Callable[..., type] = collections.namedtuple
_SCALAR_DEFAULTS = (str, int, float, bool, type(None))


def _identifier(name: Any, what: str) -> str:
    if type(name) is not str or not name.isidentifier() or name.startswith("_") or len(name) > 64:
        raise ValueError(f"{what} must be a public identifier of at most 64 characters")
    return name


def _namedtuple(typename: str, field_names: Any, *, defaults: Any = None) -> type:
    """collections.namedtuple for hooks: public field names only (``_replace``/``_asdict`` and the
    other underscore helpers stay unreachable), scalar defaults, and each distinct class made
    once per process (later calls with the same definition return it)."""
    _identifier(typename, "typename")
    fields = field_names.replace(",", " ").split() if type(field_names) is str else field_names
    if type(fields) not in (list, tuple) or len(fields) > MAX_FIELDS:
        raise ValueError(f"field_names must be a string or a list of at most {MAX_FIELDS} names")
    fields = tuple(_identifier(name, "a field name") for name in fields)
    if len(set(fields)) != len(fields):
        raise ValueError("duplicate field names")
    defaults = () if defaults is None else defaults
    if type(defaults) not in (list, tuple) or len(defaults) > len(fields):
        raise ValueError("defaults must be a list no longer than the fields")
    if any(type(value) not in _SCALAR_DEFAULTS for value in defaults):
        raise TypeError("namedtuple defaults in hooks are str, int, float, bool or None")
    key = (typename, fields, tuple((type(value), value) for value in defaults))
    cls = _NAMEDTUPLES.get(key)
    if cls is None:
        if len(_NAMEDTUPLES) >= MAX_NAMEDTUPLES:
            raise too_big("namedtuple classes", len(_NAMEDTUPLES) + 1, MAX_NAMEDTUPLES)
        cls = _make_namedtuple(typename, fields, defaults=defaults, module="__hook__")
        expose(cls, fields)
        expose_checked(cls, guards.checked_methods(tuple))
        _NAMEDTUPLES[key] = cls
    return cls


# --------------------------------------------------------------------------- operator, string, base64


def _itemgetter(*items: Any) -> Any:
    for item in items:  # the getter hashes or compares them against every object it is given
        check_work(item)
    return operator.itemgetter(*items)


def _b64_checked(func: Callable[..., bytes]) -> Callable[..., bytes]:
    def call(data: Any, *args: Any, **kwargs: Any) -> bytes:
        if isinstance(data, (str, bytes)) and len(data) > limits.MAX_STR * 3 // 4:
            raise too_big(f"{func.__name__}() input size", len(data), limits.MAX_STR * 3 // 4)
        return func(data, *args, **kwargs)

    call.__name__ = func.__name__
    return call


_HASHES = "md5 sha1 sha224 sha256 sha384 sha512 sha3_224 sha3_256 sha3_384 sha3_512 blake2b blake2s"
_HASHLIB = _pick(hashlib, _HASHES)  # no new()/pbkdf2_hmac/scrypt/shake_* (sized outputs, slow KDFs)
for _ctor in _HASHLIB.values():
    expose(type(_ctor()), ["update", "digest", "hexdigest", "copy", "name", "digest_size", "block_size"])

_lru_wrapper = type(functools.lru_cache()(lambda: None))
expose(_lru_wrapper, ["cache_info", "cache_clear"])
expose(type(functools.lru_cache()(lambda: None).cache_info()), ["hits", "misses", "maxsize", "currsize"])
expose_checked(Counter, {"elements": lambda counter: ticking(counter.elements())})

# --------------------------------------------------------------------------- hash/compare work
# (guards.check_work): what these functions hash or compare in C is checked first.


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    check_work(args)  # the cache key is hashed as a whole: f(*big) is one big tuple
    if kwargs:
        check_work(kwargs)


class _CheckedCache:
    """``functools.lru_cache``/``cache`` in hooks: the cache hashes every call's arguments."""

    __slots__ = ("_wrapper",)

    def __init__(self, wrapper: Any) -> None:
        self._wrapper = wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        return self._wrapper(*args, **kwargs)

    def cache_info(self) -> Any:
        return self._wrapper.cache_info()

    def cache_clear(self) -> None:
        self._wrapper.cache_clear()


expose(_CheckedCache, ["cache_info", "cache_clear"])


def _lru_cache(maxsize: Any = 128, typed: bool = False) -> Any:
    if callable(maxsize) and not isinstance(maxsize, bool):  # @lru_cache without arguments
        return _CheckedCache(functools.lru_cache(128, typed)(maxsize))
    decorate = functools.lru_cache(maxsize, typed)
    return lambda func: _CheckedCache(decorate(func))


def _cache(func: Any) -> _CheckedCache:
    return _CheckedCache(functools.cache(func))


def _item_checked(func: Callable[..., Any], position: int) -> Callable[..., Any]:
    """``func`` whose argument ``position`` is compared against others in C (heappush's item,
    bisect's x): checked first."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) > position:
            check_work(args[position])
        return func(*args, **checked_key(kwargs))

    call.__name__ = func.__name__
    return call


def _iterable_checked(func: Callable[..., Any], position: int) -> Callable[..., Any]:
    """``func`` whose argument ``position`` is an iterable whose items it hashes or compares."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) > position:
            args = (*args[:position], checking(args[position]), *args[position + 1:])
        return func(*args, **checked_key(kwargs))

    call.__name__ = func.__name__
    return call


def _heappop(heap: list[Any]) -> Any:
    if type(heap) is list and heap:
        check_work(heap[-1])  # the last item moves down, compared with the children
    return heapq.heappop(heap)


def _merge(*iterables: Any, key: Any = None, reverse: bool = False) -> Any:
    key = checked_key({"key": key})["key"]
    return ticking(heapq.merge(*[checking(it) for it in iterables], key=key, reverse=reverse))


_HEAPQ = {"heappush": _item_checked(heapq.heappush, 1), "heappop": _heappop,
          "heapify": _iterable_checked(heapq.heapify, 0),
          "heapreplace": _item_checked(heapq.heapreplace, 1),
          "heappushpop": _item_checked(heapq.heappushpop, 1),
          "nlargest": _iterable_checked(heapq.nlargest, 1),
          "nsmallest": _iterable_checked(heapq.nsmallest, 1),
          "merge": _merge}
_BISECT = {name: _item_checked(getattr(bisect, name), 1)
           for name in ("bisect", "bisect_left", "bisect_right", "insort", "insort_left", "insort_right")}


def _mapping_checked(cls: type, position: int) -> Callable[..., Any]:
    """A dict subclass constructor (Counter, OrderedDict, defaultdict) hashing its input's keys."""

    def make(*args: Any, **kwargs: Any) -> Any:
        if len(args) > position:
            source = args[position]
            source = check_work(source) if isinstance(source, dict) else checking(source)
            args = (*args[:position], source, *args[position + 1:])
        return cls(*args, **kwargs)

    make.__name__ = cls.__name__
    REAL_TYPES[make] = cls
    return make


expose(Counter, guards.readable_names(Counter) - {"subtract"})
expose_checked(Counter, {"subtract": lambda counter, *args, **kwargs: counter.subtract(
    *[check_work(a) if isinstance(a, dict) else checking(a) for a in args], **kwargs)})

_STATIC: dict[str, dict[str, Any]] = {
    "math": _MATH,
    "itertools": _ITERTOOLS,
    "functools": {**_pick(functools, "reduce partial cmp_to_key"), "lru_cache": _lru_cache, "cache": _cache},
    "bisect": _BISECT,
    "heapq": _HEAPQ,
    "collections": {"deque": deque, "OrderedDict": _mapping_checked(OrderedDict, 0),
                    "defaultdict": _mapping_checked(defaultdict, 1), "Counter": _mapping_checked(Counter, 0),
                    "namedtuple": _namedtuple},
    "json": {"dumps": _dumps, "loads": _loads},
    "operator": {"itemgetter": _itemgetter},
    "string": _pick(string, "ascii_letters ascii_lowercase ascii_uppercase digits hexdigits octdigits "
                            "punctuation printable whitespace"),
    "base64": {name: _b64_checked(getattr(base64, name)) for name in (
        "b64encode", "b64decode", "urlsafe_b64encode", "urlsafe_b64decode", "b16encode", "b16decode")},
    "zlib": _pick(zlib, "crc32 adler32"),
    "hashlib": _HASHLIB,
    "time": _pick(time, "time time_ns monotonic monotonic_ns perf_counter perf_counter_ns"),
}


# --------------------------------------------------------------------------- scriptlb.balancers
# `from scriptlb.balancers import chash, roundrobin, ewma`, as resty.chash/resty.roundrobin. The
# classes are handed out as they are: a class has no attribute a hook can read (no registered
# names), instances only the methods of HOOK_API, and balancing/resty.py caps the sizes of what one
# call builds or walks. ewma's test hooks (rng=, clock=) are left out: a hook's own callables
# would run inside host code.


def _hook_ewma(nodes: balancers.Nodes, decay: float = balancers.DECAY_TIME,
               peak: bool = False) -> balancers.ewma:
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < 1e9:
        raise ValueError("decay must be a number of seconds > 0")
    if not isinstance(peak, bool):
        raise TypeError(f"peak must be a bool, not {type(peak).__name__}")
    return balancers.ewma(nodes, decay=float(decay), peak=peak)


_hook_ewma.__name__ = "ewma"
REAL_TYPES[_hook_ewma] = balancers.ewma  # isinstance(x, ewma) in hooks
for _cls, _names in balancers.HOOK_API.items():
    expose(_cls, _names)
_STATIC["scriptlb.balancers"] = {"chash": balancers.chash, "roundrobin": balancers.roundrobin,
                                 "ewma": _hook_ewma}

_SHARED = {name: SafeModule(name, members) for name, members in _STATIC.items()}
# `import scriptlb.balancers` binds the top-level name, as Python does: a package stand-in
# holding that one submodule (`import scriptlb` alone stays refused)
PARENTS = {"scriptlb": SafeModule("scriptlb", {"balancers": _SHARED["scriptlb.balancers"]})}
ALLOWED = frozenset([*_STATIC, "random"])


def standard_module(name: str, per_importer: dict[str, SafeModule]) -> SafeModule | None:
    """The stand-in for ``import name``, or None if ``name`` is not on the allow-list.

    ``per_importer`` caches stand-ins with state of their own (``random``) for one hook/module.
    """
    module = _SHARED.get(name)
    if module is not None:
        return module
    if name == "random":
        module = per_importer.get(name)
        if module is None:
            module = per_importer[name] = _random_module()
        return module
    return None


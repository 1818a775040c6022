"""Runtime guards the compiled hook code calls, and the builtins a hook sees.

RestrictedPython rewrites ``a.b`` into ``_getattr_(a, "b")``, ``a[b]`` into ``_getitem_(a, b)``,
stores into ``_write_(a)...``; our policy (policy.py) adds ``_add_``/``_mul_``/``_pow_``/
``_lshift_``/``_mod_`` for the operators that can build huge objects in one C call,
``_format_``/``_check_size_`` for f-strings and starred displays, and ``_tick_`` for the CPU
budget. This module implements them.

Attribute reads are deny-by-default: a type is readable only through the names registered with
``expose()`` (builtin types' safe methods are registered below, the API and module stand-ins
register theirs). Names starting with ``_`` never pass. Methods that can build huge results
(``str.ljust``, ``list.extend``...) are handed out as size-checked wrappers.
"""

from __future__ import annotations

import builtins
import codecs
import operator
import re
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from scriptlb.sandbox import limits
from scriptlb.sandbox.limits import (
    BYTE_NS,
    COPY_NS,
    HASH_NS,
    MAX_FORMAT_WIDTH,
    MAX_INT_BITS,
    MAX_ITEMS,
    MAX_POWMOD_BITS,
    MAX_RANGE,
    MAX_STR,
    SCAN_NS,
    SandboxLimitError,
    charge,
)

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

# --------------------------------------------------------------------------- registry

_ATTRS: dict[type, frozenset[str]] = {}  # type -> names readable with plain getattr
_CHECKED: dict[type, dict[str, Callable[..., Any]]] = {}  # type -> name -> fn(obj, *args)
_DYNAMIC: dict[type, Callable[[Any, str], Any]] = {}  # type -> lookup(obj, name) (ngx.var)
_CLASS_ATTRS: dict[type, frozenset[str]] = {}  # exposed class -> readable class attributes
_WRITABLE: set[type] = {dict, set, deque, OrderedDict, defaultdict, Counter}
# _ATTRS and _CHECKED merged, for one lookup per read: type -> name -> None (a plain name) or the
# checked method (plain names win, as they are tested first); kept in step by expose*()
_NAMES: dict[type, dict[str, Callable[..., Any] | None]] = {}


def _not_exposed(*_args: Any) -> None:
    """A marker (``_NAMES``' default), never called."""
    raise AssertionError("not a method")



def _merge(cls: type) -> None:
    table: dict[str, Callable[..., Any] | None] = {
        name: method for name, method in _CHECKED.get(cls, {}).items() if not name.startswith("_")}
    table.update(dict.fromkeys(_ATTRS.get(cls, ())))
    _NAMES[cls] = table


def expose(cls: type, names: Iterable[str]) -> None:
    """Let hook code read ``names`` on instances of exactly ``cls``."""
    names = frozenset(names)
    bad = [n for n in names if n.startswith("_")]
    if bad:
        raise ValueError(f"cannot expose private names {bad}")
    _ATTRS[cls] = names
    _merge(cls)


def readable_names(cls: type) -> frozenset[str]:
    return _ATTRS.get(cls, frozenset())


def expose_checked(cls: type, methods: dict[str, Callable[..., Any]]) -> None:
    """Hand out ``methods[name]`` bound to the instance instead of the real method."""
    _CHECKED.setdefault(cls, {}).update(methods)
    _merge(cls)


def expose_dynamic(cls: type, lookup: Callable[[Any, str], Any]) -> None:
    """Attribute reads on ``cls`` go through ``lookup(obj, name)`` (which raises AttributeError)."""
    _DYNAMIC[cls] = lookup


def writable(cls: type) -> None:
    """Let hook code store items and attributes into instances of ``cls`` (ngx.ctx)."""
    _WRITABLE.add(cls)


def checked_methods(cls: type) -> dict[str, Callable[..., Any]]:
    """The checked methods registered for ``cls`` (to register them for a subclass too)."""
    return dict(_CHECKED.get(cls, {}))


def checked_method(obj: Any, name: str) -> Any:
    """The checked (size/work-bounded) method ``name`` of ``obj``'s base dict type, bound to
    ``obj``, or None: for dict subclasses with attribute-style items (ngx.ctx)."""
    for cls in type(obj).__mro__:
        checked = _CHECKED.get(cls)
        if checked is not None and name in checked:
            return partial(checked[name], obj)
    return None


def too_big(what: str, size: int, limit: int) -> SandboxLimitError:
    return SandboxLimitError(f"{what} of {size} is over the sandbox limit of {limit}")


# --------------------------------------------------------------------------- attributes


def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
    """``_getattr_`` and the hook's ``getattr``: registered names only."""
    cls = type(obj)
    table = _NAMES.get(cls)
    if table is not None:
        how = table.get(name, _not_exposed)
        if how is None:
            return getattr(obj, name)
        if how is not _not_exposed:
            return partial(how, obj)  # a checked method, bound
    # A type is in at most one of the registries below, so their order is the hot paths':
    # module members (dynamic), checked methods (str.encode), hook objects.
    dynamic = _DYNAMIC.get(cls)
    if dynamic is not None:
        if type(name) is str and not name.startswith("_"):
            try:
                return dynamic(obj, name)
            except AttributeError:
                if default:
                    return default[0]
                raise
    elif type(name) is str and not name.startswith("_"):
        checked = _CHECKED.get(cls)
        if checked is not None and name in checked:
            return partial(checked[name], obj)
        if type(cls) is HookClass and (name in obj.__dict__ or _defined_by_hook(cls, name)):  # a hook object
            return getattr(obj, name, *default)
    return _getattr_slow(obj, name, default)


def _getattr_slow(obj: Any, name: str, default: tuple[Any, ...]) -> Any:
    if type(name) is not str:
        raise TypeError("attribute name must be a string")
    if not name.startswith("_"):
        cls = type(obj)
        checked = _CHECKED.get(cls)
        if checked is not None and name in checked:
            return partial(checked[name], obj)
        if cls is type and name in _CLASS_ATTRS.get(obj, ()):
            return getattr(obj, name)
        if name == "args" and isinstance(obj, Exception):
            return obj.args
    if default:
        return default[0]
    raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}' visible to hooks")


def guarded_hasattr(obj: Any, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


class _ListWriter:
    """What ``_write_(a_list)`` returns: slice assignment could double a list in one C call."""

    __slots__ = ("_list",)

    def __init__(self, target: list[Any]) -> None:
        self._list = target

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(key) is slice:
            value = list(value)
            if len(self._list) + len(value) > MAX_ITEMS:
                raise too_big("list size", len(self._list) + len(value), MAX_ITEMS)
        self._list[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._list[key]


def guarded_write(obj: Any) -> Any:
    """``_write_``: item stores on the hook's own containers, attribute stores on the hook's own
    classes and their instances; never on modules or the API."""
    cls = type(obj)
    if cls is list:
        return _ListWriter(obj)
    if cls in _WRITABLE or cls is HookClass or type(cls) is HookClass:
        return obj
    raise TypeError(f"a hook cannot modify a '{cls.__name__}' object")


# --------------------------------------------------------------------------- hook classes
#
# A ``class`` statement in a hook builds a ``HookClass`` (the compiler policy makes it the
# metaclass of every class statement). What keeps classes as safe as functions:
#
# * the only special method a hook class may define is ``__init__`` (refused at compile time and
#   again here): ``__eq__``, ``__hash__``, ``__lt__``, ``__len__``, ``__iter__``, ``__str__``,
#   ``__del__``, ``__getattr__``, ``__init_subclass__``, ``__set_name__``... would be called
#   from C, inside sorted(), dict lookups, json.dumps or host code, and after the run is over
#   (a finalizer, an error message built by the runner). Instances therefore compare, hash and
#   print with object's C defaults. ``__init__`` runs only when hook code calls the class, and
#   starts with a budget check like every hook function (outside a run it stops at once);
# * bases are other hook classes or the exceptions hooks can raise, never builtin types: a
#   ``str``/``dict``/``int`` subclass could reach the API or C code posing as the real thing;
# * no class keywords (metaclass, ``__init_subclass__`` arguments);
# * attribute reads stay deny-by-default: an instance offers what it was assigned and what its
#   hook classes define (methods, properties, class attributes), never what ``object``/``type``
#   define (``mro``, ``__subclasses__``...); ``super()`` resolves only in hook classes.

_CLASS_KEYS = frozenset({"__module__", "__qualname__", "__init__", "__classcell__", "__doc__"})
MAX_CLASS_MEMBERS = 1000


class HookClass(type):
    """The type of every class a hook defines (see above)."""

    def __new__(mcs, name: str, bases: tuple[Any, ...], namespace: dict[str, Any], **keywords: Any) -> Any:
        if keywords:
            raise TypeError("class keywords are not allowed in hooks")
        for base in bases:
            if type(base) is not HookClass and base not in _EXCEPTION_BASES:
                raise TypeError("a hook class can derive only from hook classes and exceptions, "
                                f"not from '{getattr(base, '__name__', type(base).__name__)}'")
        for key in namespace:
            if type(key) is not str or (key.startswith("_") and key not in _CLASS_KEYS):
                raise TypeError(f"'{key}' is not allowed in a hook class")
        if len(namespace) > MAX_CLASS_MEMBERS:
            raise too_big("class members", len(namespace), MAX_CLASS_MEMBERS)
        return super().__new__(mcs, name, bases, namespace)


def _defined_by_hook(cls: type, name: str) -> bool:
    """``name`` is defined by one of the hook classes of ``cls``'s MRO."""
    if type(cls) is HookClass and name in cls.__dict__:  # the common case, without a generator
        return True
    return any(type(klass) is HookClass and name in klass.__dict__ for klass in cls.__mro__[1:])


def _hook_class_attribute(cls: Any, name: str) -> Any:
    if _defined_by_hook(cls, name):
        return getattr(cls, name)
    raise AttributeError(f"type object '{cls.__name__}' has no attribute '{name}' visible to hooks")


def _super_attribute(proxy: Any, name: str) -> Any:
    """``super().method``: found in the hook classes after the current one, nowhere else."""
    mro = proxy.__self_class__.__mro__
    start = mro.index(proxy.__thisclass__) + 1 if proxy.__thisclass__ in mro else len(mro)
    for klass in mro[start:]:
        if type(klass) is HookClass and name in klass.__dict__:
            return getattr(proxy, name)
    raise AttributeError(f"'super' object has no attribute '{name}' visible to hooks")


def super_init(proxy: Any) -> Any:
    """``_super_init_``: the compiled form of ``super().__init__`` (the one private name a
    hook may read): the next ``__init__`` of the MRO, a hook's, an exception's or object's."""
    if type(proxy) is not super:
        raise TypeError("only super().__init__ is allowed")
    return super.__getattribute__(proxy, "__init__")  # (what proxy.__init__ reads)


_DYNAMIC[HookClass] = _hook_class_attribute
_DYNAMIC[super] = _super_attribute
_PROPERTY_NAMES = ["getter", "setter", "deleter"]


# --------------------------------------------------------------------------- operators


def _sized_limit(cls: type) -> int:
    if cls is str or cls is bytes:
        return MAX_STR
    if cls is list or cls is tuple or cls is deque:
        return MAX_ITEMS
    return 0


def check_size(value: Any) -> Any:
    """``_check_size_``: after f-strings and starred displays, which can double a value."""
    limit = _sized_limit(type(value))
    if limit and len(value) > limit:
        raise too_big("size", len(value), limit)
    return value


def guarded_add(a: Any, b: Any) -> Any:
    limit = _sized_limit(type(a))
    if limit and _sized_limit(type(b)):
        if len(a) + len(b) > limit:  # refused before building it
            raise too_big("size", len(a) + len(b), limit)
        charge(len(a) + len(b), COPY_NS if limit == MAX_ITEMS else BYTE_NS)
    result = a + b
    cls = type(result)
    if cls is int or cls is float:
        return result
    limit = _sized_limit(cls)
    if limit and len(result) > limit:  # at most twice the limit was built: bounded
        raise too_big("size", len(result), limit)
    return result


def _check_repeat(seq: Any, times: Any) -> None:
    limit = _sized_limit(type(seq))
    if limit:
        n = operator.index(times)
        if n > 0 and len(seq) * n > limit:
            raise too_big("size", len(seq) * n, limit)
        charge(len(seq) * n, COPY_NS if limit == MAX_ITEMS else BYTE_NS)


def guarded_mul(a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is int and tb is int:
        if a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise too_big("int size in bits", a.bit_length() + b.bit_length(), MAX_INT_BITS)
        return a * b
    if ta is float or tb is float:
        return a * b
    if _sized_limit(ta):
        _check_repeat(a, b)
    elif _sized_limit(tb):
        _check_repeat(b, a)
    return a * b


def guarded_pow(base: Any, exp: Any, mod: Any = None) -> Any:
    """``**`` and ``pow()``: refuse results (or modular exponentiations) too big to compute."""
    if mod is not None:
        for value in (exp, mod):
            if isinstance(value, int) and abs(value).bit_length() > MAX_POWMOD_BITS:
                raise too_big("pow() argument size in bits", abs(value).bit_length(), MAX_POWMOD_BITS)
        return pow(base, exp, mod)
    if isinstance(base, int) and isinstance(exp, int) and exp > 0:
        bits = abs(base).bit_length()
        if bits > 1 and (bits - 1) * exp > MAX_INT_BITS:
            raise too_big("int size in bits", (bits - 1) * exp, MAX_INT_BITS)
    return base**exp


def guarded_lshift(a: Any, n: Any) -> Any:
    if isinstance(a, int) and isinstance(n, int) and a and a.bit_length() + n > MAX_INT_BITS:
        raise too_big("int size in bits", a.bit_length() + n, MAX_INT_BITS)
    return a << n


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?.?", re.S)


def _check_width(text: str) -> None:
    if text == "*":
        raise SandboxLimitError("'*' widths are not allowed in hook format strings")
    if text and (len(text) > 6 or int(text) > MAX_FORMAT_WIDTH):
        raise too_big("format width", int(text) if len(text) < 20 else 10**19, MAX_FORMAT_WIDTH)


def _check_percent_format(fmt: str) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        _check_width(match.group(1))
        if match.group(2) is not None:
            _check_width(match.group(2))


def _check_format_args(args: Any) -> None:
    if type(args) is tuple:
        for arg in args:
            check_text(arg)
    elif isinstance(args, dict):
        for arg in args.values():
            check_text(arg)
    else:
        check_text(args)


def guarded_mod(a: Any, b: Any) -> Any:
    cls = type(a)
    if cls is int:  # (the usual `hash % len(peers)`)
        return a % b
    if cls is str:
        _check_percent_format(a)
        _check_format_args(b)
        return check_size(a % b)
    if cls is bytes:
        _check_percent_format(a.decode("latin-1"))
        _check_format_args(b)
        return check_size(a % b)
    return a % b


# --------------------------------------------------------------------------- text of containers

_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})
_COPIED = (list, tuple, str, bytes, set, frozenset, dict, deque, range)  # sized: charge by len()
_SEQUENCES = (list, tuple, set, frozenset, deque)


def text_size(obj: Any, limit: int) -> int:
    """An estimate of ``len(repr(obj))``, computed without building it; stops past ``limit``.

    ``[s] * 2**20`` is a small list whose text is a terabyte when ``s`` is a 1 MiB string:
    str(), repr(), f-strings, %-formatting and json.dumps build that text inside one C call.
    Shared references count every time (as in the text); a cycle counts until ``limit``.
    """
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        cls = type(item)
        if cls is str or cls is bytes:
            total += len(item) + 3
        elif cls is int:
            total += item.bit_length() // 3 + 2
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, _SEQUENCES):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, BaseException):
            total += 32
            stack.extend(item.args)
        else:
            total += 32
        if total > limit:
            break
    return total


def check_text(value: Any) -> Any:
    """``_text_``: an f-string field's value, refused when its text would be huge."""
    if type(value) not in _SCALARS:
        size = text_size(value, MAX_STR)
        if size > MAX_STR:
            raise too_big("text size (estimated)", size, MAX_STR)
    return value


def guarded_repr(obj: Any) -> str:
    return repr(check_text(obj))


def guarded_ascii(obj: Any) -> str:
    return ascii(check_text(obj))


_INT_IN_SPEC = re.compile(r"\d+")


def _check_format_spec(spec: str) -> None:
    for number in _INT_IN_SPEC.findall(spec):
        _check_width(number)


def guarded_format(value: Any, spec: str = "") -> str:
    """The hook's ``format()``: widths and precisions are capped."""
    if type(spec) is not str:
        raise TypeError("format spec must be a str")
    if spec:
        _check_format_spec(spec)
    return format(check_text(value), spec)


def fstring_field(value: Any, spec: str, conversion: int) -> str:
    """``_format_``: one ``{value!c:spec}`` field of an f-string, with the spec checked."""
    check_text(value)
    if conversion == ord("r"):
        value = repr(value)
    elif conversion == ord("s"):
        value = str(value)
    elif conversion == ord("a"):
        value = ascii(value)
    return guarded_format(value, spec)


_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "-=": operator.isub,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "|=": operator.ior,
    "^=": operator.ixor,
    "@=": operator.imatmul,
}


def _iadd(a: Any, b: Any) -> Any:
    if type(a) is list or type(a) is deque:  # in place: check before growing the shared object
        b = list(b)
        if len(a) + len(b) > MAX_ITEMS:
            raise too_big("size", len(a) + len(b), MAX_ITEMS)
        a += b
        return a
    return guarded_add(a, b)


def _imul(a: Any, b: Any) -> Any:
    if type(a) is list:
        _check_repeat(a, b)
        a *= b
        return a
    return guarded_mul(a, b)


_INPLACE.update({"+=": _iadd, "*=": _imul, "**=": guarded_pow, "<<=": guarded_lshift, "%=": guarded_mod})


def guarded_inplacevar(op: str, target: Any, value: Any) -> Any:
    """``_inplacevar_``: ``x op= y`` on a name, with the same size checks as the operators."""
    return _INPLACE[op](target, value)


# --------------------------------------------------------------------------- builtins


def guarded_range(*args: int) -> range:
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise too_big("range() length", n, MAX_RANGE)
    return r


def _codec_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Check the (encoding, errors) of str(b, encoding, errors) / bytes(s, encoding, errors)."""
    if len(args) > 1 or kwargs:
        encoding = args[1] if len(args) > 1 else kwargs.get("encoding", "utf-8")
        errors = args[2] if len(args) > 2 else kwargs.get("errors", "strict")
        _check_codec(encoding, errors)


def guarded_bytes(*args: Any, **kwargs: Any) -> bytes:
    if args and isinstance(args[0], int) and args[0] > MAX_STR:
        raise too_big("bytes() length", args[0], MAX_STR)
    _codec_arguments(args, kwargs)
    return bytes(*args, **kwargs)


def guarded_str(*args: Any, **kwargs: Any) -> str:
    if len(args) == 1 and not kwargs:
        return str(check_text(args[0]))
    _codec_arguments(args, kwargs)
    return str(*args, **kwargs)


_REAL_TYPES: dict[Any, type] = {}  # guarded constructor -> the type it stands for
REAL_TYPES = _REAL_TYPES


def _real_type(spec: Any) -> Any:
    if type(spec) is tuple:
        return tuple(_real_type(item) for item in spec)
    return _REAL_TYPES.get(spec, spec)


def guarded_isinstance(obj: Any, spec: Any) -> bool:
    """``isinstance(x, str)`` works although ``str`` is a guarded constructor in hooks."""
    return isinstance(obj, _real_type(spec))


def guarded_issubclass(cls: Any, spec: Any) -> bool:
    """``issubclass(MyError, ValueError)``, with the same mapping as isinstance."""
    return issubclass(_real_type(cls), _real_type(spec))


def guarded_sum(iterable: Iterable[Any], /, start: Any = 0) -> Any:
    if type(start) not in (int, float, bool):
        raise TypeError("sum() in a hook adds numbers only")
    if isinstance(iterable, _COPIED):
        charge(len(iterable), SCAN_NS)
    return sum(iterable, start)


def guarded_round(number: Any, ndigits: Any = None) -> Any:
    # round(1, -10**8) computes 10**(10**8) inside one C call
    if ndigits is not None and isinstance(ndigits, int) and abs(ndigits) > MAX_FORMAT_WIDTH:
        raise too_big("round() ndigits", abs(ndigits), MAX_FORMAT_WIDTH)
    return round(number, ndigits)


def guarded_iter(obj: Any) -> Any:
    """Only the one-argument form: ``iter(callable, sentinel)`` is an unbounded C loop."""
    return iter(obj)


def ticking(iterator: Iterable[Any]) -> Iterator[Any]:
    """Re-yield ``iterator`` checking the budget per item, so C consumers (list, sum, max, set...)
    of a long or unbounded C iterator are stopped like a Python loop."""
    tick = limits.tick
    for item in iterator:
        tick()
        yield item


def ticking_factory(factory: Callable[..., Iterable[Any]]) -> Callable[..., Iterator[Any]]:
    """``factory`` (zip, map, itertools.chain...) whose iterators tick per item."""

    def make(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return ticking(factory(*args, **kwargs))

    make.__name__ = getattr(factory, "__name__", "iterator")
    return make


def apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``_apply_``: calls with ``*args``/``**kwargs``."""
    return func(*args, **kwargs)


def _checked_join(sep: Any, iterable: Iterable[Any]) -> Any:
    if isinstance(iterable, _COPIED):
        charge(len(iterable), SCAN_NS)  # the copy, the lengths and the join
    items = list(iterable)
    total = len(sep) * max(len(items) - 1, 0) + sum(map(len, items))  # at C speed
    if total > MAX_STR:
        raise too_big("joined size", total, MAX_STR)
    return sep.join(items)


def _checked_pad(method: str) -> Callable[..., Any]:
    def pad(s: Any, width: int, *args: Any) -> Any:
        if operator.index(width) > MAX_STR:
            raise too_big(f"{method}() width", width, MAX_STR)
        return getattr(s, method)(width, *args)

    pad.__name__ = method
    return pad


def _checked_replace(s: Any, old: Any, new: Any, count: int = -1) -> Any:
    n = s.count(old) if old else len(s) + 1
    if count >= 0:
        n = min(n, count)
    grown = len(s) + n * (len(new) - len(old))
    if grown > MAX_STR:
        raise too_big("replace() result size", grown, MAX_STR)
    return s.replace(old, new, count)


def _checked_extend(target: Any, iterable: Iterable[Any]) -> None:
    if isinstance(iterable, _COPIED):
        if len(target) + len(iterable) > MAX_ITEMS:  # refused before any work
            raise too_big("size", len(target) + len(iterable), MAX_ITEMS)
        charge(len(iterable), COPY_NS)
    items = list(iterable)
    if len(target) + len(items) > MAX_ITEMS:
        raise too_big("size", len(target) + len(items), MAX_ITEMS)
    target.extend(items)


def _checked_extendleft(target: deque[Any], iterable: Iterable[Any]) -> None:
    items = list(iterable)
    if len(target) + len(items) > MAX_ITEMS:
        raise too_big("size", len(target) + len(items), MAX_ITEMS)
    target.extendleft(items)


def _checked_to_bytes(n: int, length: int = 1, *args: Any, **kwargs: Any) -> bytes:
    if length > MAX_STR:
        raise too_big("to_bytes() length", length, MAX_STR)
    return n.to_bytes(length, *args, **kwargs)


# Codecs implemented in C with linear cost. Others run stdlib Python code (punycode is quadratic)
# inside one call, where no tick can stop them, or transform rather than encode (rot13, zlib).
SAFE_CODECS = frozenset({"utf-8", "ascii", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                         "utf-32-le", "utf-32-be"})
_SAFE_ERRORS = frozenset({"strict", "ignore", "replace", "backslashreplace", "surrogateescape",
                          "xmlcharrefreplace"})


def _check_codec(encoding: Any, errors: Any) -> None:
    if type(encoding) is not str or type(errors) is not str:
        raise TypeError("encoding and errors must be str")
    if encoding in SAFE_CODECS and errors in _SAFE_ERRORS:  # a codec's own name: no lookup needed
        return
    if codecs.lookup(encoding).name not in SAFE_CODECS:
        raise LookupError(f"encoding '{encoding}' is not allowed in hooks")
    if errors not in _SAFE_ERRORS:
        raise LookupError(f"error handler '{errors}' is not allowed in hooks")


_UTF8, _STRICT = "utf-8", "strict"  # the defaults below, by identity


def _checked_encode(s: str, encoding: str = _UTF8, errors: str = _STRICT) -> bytes:
    if encoding is _UTF8 and errors is _STRICT:  # `text.encode()`: nothing to check
        return s.encode()
    _check_codec(encoding, errors)
    return s.encode(encoding, errors)


def encoded(value: Any) -> Any:
    """``value.encode()`` with no arguments, as the compiler policy writes it (``_encode_``):
    a str's UTF-8 bytes (what the checked ``str.encode`` gives for no arguments), anything else
    as ``_getattr_(value, "encode")()`` would do. Hooks hash text this way on every run
    (``zlib.crc32(uri.encode())``): one call instead of the attribute guard, a bound wrapper
    and the wrapper's call."""
    if type(value) is str:
        return value.encode()
    return guarded_getattr(value, "encode")()


def _checked_decode(b: bytes, encoding: str = "utf-8", errors: str = "strict") -> str:
    _check_codec(encoding, errors)
    return b.decode(encoding, errors)


_STR_METHODS = [
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha",
    "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace",
    "istitle", "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind",
    "rindex", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip",
    "swapcase", "title", "upper"
]  # no format/format_map (attribute walking), translate/expandtabs (size blow-ups)
_BYTES_METHODS = [m for m in _STR_METHODS if m not in ("casefold", "isdecimal", "isidentifier",
                                                        "isnumeric", "isprintable")] + ["hex"]
_PAD = {name: _checked_pad(name) for name in ("center", "ljust", "rjust", "zfill")}
_SEQ_CHECKED: dict[str, Callable[..., Any]] = {**_PAD, "join": _checked_join, "replace": _checked_replace}
_DICT_METHODS = ["clear", "copy", "get", "items", "keys", "pop", "popitem", "setdefault", "update", "values"]
_SET_READ = ["copy", "isdisjoint", "issubset", "issuperset", "symmetric_difference"]


def _checked_multi(method: str) -> Callable[..., Any]:
    """set.union(*others) and friends loop over every argument in one C call: with ``others``
    being ``[big] * 1000`` that is a billion steps no tick can stop."""

    def call(target: Any, *others: Any) -> Any:
        total = sum(len(other) for other in others if isinstance(other, _SIZED_INPUTS))
        if len(others) > limits.MAX_REPEAT or total > 4 * MAX_ITEMS:
            raise too_big(f"{method}() input size", max(total, len(others)), 4 * MAX_ITEMS)
        return getattr(target, method)(*[checking(other) for other in others])

    call.__name__ = method
    return call


_SIZED_INPUTS = (str, bytes, list, tuple, dict, set, frozenset, deque, range)
_SET_MULTI = {name: _checked_multi(name) for name in ("union", "intersection", "difference")}
_SET_MULTI_UPDATE = {name: _checked_multi(name) for name in ("update", "intersection_update",
                                                              "difference_update")}

expose(str, _STR_METHODS)
expose_checked(str, {**_SEQ_CHECKED, "encode": _checked_encode})
expose(bytes, _BYTES_METHODS)
expose_checked(bytes, {**_SEQ_CHECKED, "decode": _checked_decode})
expose(list, ["append", "clear", "copy", "count", "index", "insert", "pop", "remove", "reverse", "sort"])
expose_checked(list, {"extend": _checked_extend})
expose(tuple, ["count", "index"])
expose(dict, _DICT_METHODS)
expose(OrderedDict, [*_DICT_METHODS, "move_to_end"])
expose(defaultdict, _DICT_METHODS)
expose(Counter, [*_DICT_METHODS, "most_common", "subtract", "total"])
expose(set, [*_SET_READ, "add", "clear", "discard", "pop", "remove", "symmetric_difference_update"])
expose_checked(set, {**_SET_MULTI, **_SET_MULTI_UPDATE})
expose(frozenset, _SET_READ)
expose_checked(frozenset, _SET_MULTI)
expose(deque, ["append", "appendleft", "clear", "copy", "count", "index", "insert", "maxlen", "pop",
               "popleft", "remove", "reverse", "rotate"])
expose_checked(deque, {"extend": _checked_extend, "extendleft": _checked_extendleft})
_NUMBER = ["conjugate", "real", "imag"]
expose(int, [*_NUMBER, "bit_length", "bit_count", "numerator", "denominator"])
expose_checked(int, {"to_bytes": _checked_to_bytes})
expose(bool, [*_NUMBER, "bit_length", "bit_count", "numerator", "denominator"])
expose(float, [*_NUMBER, "is_integer", "as_integer_ratio", "hex"])
expose(range, ["start", "stop", "step", "count", "index"])
_CLASS_ATTRS[dict] = frozenset({"fromkeys"})


_EXCEPTIONS = (
    Exception, ArithmeticError, AssertionError, AttributeError, ImportError, ModuleNotFoundError,
    IndexError, KeyError, LookupError,
    NameError, NotImplementedError, OverflowError, RecursionError, RuntimeError, StopIteration,
    TypeError, UnicodeError, UnicodeDecodeError, UnicodeEncodeError, ValueError, ZeroDivisionError,
)

_EXCEPTION_BASES = frozenset(_EXCEPTIONS)
expose(property, _PROPERTY_NAMES)

_PLAIN_BUILTINS = ["abs", "bin", "bool", "callable", "chr", "divmod",
                   "float", "hex", "int", "len", "next", "oct", "ord", "reversed", "slice",
                   ]  # dict, set, frozenset, sorted, min, max, hash: see _WORK_BUILTINS
# C iterators whose output can dwarf their input (zip(*[big] * 1000)): they tick per item
_TICKING_BUILTINS = {"zip": zip, "map": map, "filter": filter, "enumerate": enumerate}


def _charged(func: Callable[..., Any], ns_per_item: float) -> Callable[..., Any]:
    """A builtin that walks its argument in one C call (list(), tuple(), any(), all())."""

    def call(*args: Any) -> Any:
        if args and isinstance(args[0], _COPIED):
            charge(len(args[0]), ns_per_item)
        return func(*args)

    call.__name__ = func.__name__
    return call


_CHARGED = {"list": _charged(list, COPY_NS), "tuple": _charged(tuple, COPY_NS),
            "any": _charged(any, SCAN_NS), "all": _charged(all, SCAN_NS)}
_REAL_TYPES.update({_CHARGED["list"]: list, _CHARGED["tuple"]: tuple})
_REAL_TYPES.update({guarded_str: str, guarded_bytes: bytes, guarded_range: range})
_TICKING = {name: ticking_factory(cls) for name, cls in _TICKING_BUILTINS.items()}
_REAL_TYPES.update({_TICKING[name]: cls for name, cls in _TICKING_BUILTINS.items()})


def make_builtins(extra: dict[str, Any]) -> dict[str, Any]:
    """The ``__builtins__`` of hook code: plain builtins, guarded ones, guards and ``extra``.

    Built once per process and shared by every run (the runner never copies it), so hook code
    must not be able to modify it: it is only reachable as ``__builtins__``, a name hook code
    cannot spell.
    """
    table: dict[str, Any] = {name: getattr(builtins, name) for name in _PLAIN_BUILTINS}
    table.update({exc.__name__: exc for exc in _EXCEPTIONS})
    table.update({"None": None, "True": True, "False": False})
    table.update(_TICKING)
    table.update(_CHARGED)
    table.update(
        range=guarded_range, bytes=guarded_bytes, str=guarded_str, isinstance=guarded_isinstance,
        issubclass=guarded_issubclass,
        sum=guarded_sum, round=guarded_round, repr=guarded_repr, ascii=guarded_ascii,
        pow=guarded_pow, iter=guarded_iter, format=guarded_format,
        getattr=guarded_getattr, hasattr=guarded_hasattr,
        # names the compiled code calls (hook code cannot spell or shadow them)
        _getattr_=guarded_getattr, _getitem_=operator.getitem, _write_=guarded_write,
        _getiter_=iter, _apply_=apply, _inplacevar_=guarded_inplacevar,
        _add_=guarded_add, _mul_=guarded_mul, _pow_=guarded_pow, _lshift_=guarded_lshift,
        _mod_=guarded_mod, _format_=fstring_field, _text_=check_text, _check_size_=check_size,
        _tick_=limits.tick, _encode_=encoded,
        # class statements: the compiler names HookClass as their metaclass
        __build_class__=builtins.__build_class__, __metaclass__=HookClass, _super_init_=super_init,
        staticmethod=staticmethod, classmethod=classmethod, property=property, super=super,
    )
    from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence

    guarded_unpack: Callable[..., Any] = guarded_unpack_sequence  # (RestrictedPython's is untyped)

    def unpack_sequence(it: Any, spec: dict[str, Any], getiter: Any) -> Any:
        """``a, b = value``: a flat tuple needs no guarding (iter is our _getiter_ anyway), and
        ``ok, err = balancer.set_current_peer(...)`` is on the hot path."""
        if type(it) is tuple and not spec["childs"]:
            return it
        return guarded_unpack(it, spec, getiter)

    table["_iter_unpack_sequence_"] = guarded_iter_unpack_sequence
    table["_unpack_sequence_"] = unpack_sequence
    table.update(_WORK_BUILTINS)
    table.update(_cmpv_=check_work, _key_=check_work, _items_=checking, _getitem_=guarded_getitem)
    table.update(extra)
    return table



# --------------------------------------------------------------------------- comparison / hash work
#
# Hashing a tuple and comparing lists/tuples/dicts walk the whole structure inside one C call,
# counting shared references every time: with ``a = [0] * 2**20``, ``[a] * 2**20 == [b] * 2**20``
# is 10**12 steps and ``hash((t,) * 2**20)`` likewise, and sort/set/count/in loop such a walk
# over every item. No tick can stop that, so the consumers reachable from hook code (comparison
# operators, subscripts, hash(), set/frozenset/dict/sorted/min/max and the container methods
# that compare or hash) estimate the work first and refuse what is over ``MAX_WORK``.

MAX_WORK = 1 << 22  # estimated element steps of one hash/comparison walk (a few ms of C)
_WORK_SCALARS = frozenset({int, float, bool, type(None), complex, slice, range})
_TEXT = frozenset({str, bytes})
_CONTAINERS = (list, tuple, set, frozenset, deque, dict)
_DICT_VIEWS: tuple[type[dict_keys[Any, Any]], type[dict_values[Any, Any]], type[dict_items[Any, Any]]] = (
    type({}.keys()), type({}.values()), type({}.items()))


def work_size(obj: Any, limit: int = MAX_WORK) -> int:
    """An upper estimate of the element steps of hashing or comparing ``obj`` (shared references
    count every time, as the C walk visits them; a string counts 1 + len/16). Stops past
    ``limit``. Flat containers of scalars or strings are sized at C speed, once per object."""
    total = 0
    stack = [obj]
    pop = stack.pop
    flat: dict[int, int] = {}  # id -> size of a flat container seen before (shared references)
    while stack:
        item = pop()
        cls = type(item)
        if cls is str or cls is bytes:
            total += 1 + (len(item) >> 4)
        elif cls in _WORK_SCALARS:
            total += 1
        elif isinstance(item, _DICT_VIEWS):
            total += 16
            stack.append(item.mapping)
        elif isinstance(item, _CONTAINERS):
            known = flat.get(id(item))
            if known is not None:
                total += known
            else:
                total += _container_work(item, stack, flat, limit - total)
        else:
            total += 1
        if total > limit:
            break
    return total


def _container_work(item: Any, stack: list[Any], flat: dict[int, int], room: int) -> int:
    """The container's own steps, plus its flat parts; pushes the parts that are not flat."""
    size = 16 + len(item)
    if size > room:
        return size
    pushed = False
    for part in ((item.keys(), item.values()) if isinstance(item, dict) else (item,)):
        kinds = set(map(type, part))
        if kinds <= _WORK_SCALARS:
            continue
        if len(kinds) == 1 and kinds <= _TEXT:
            size += sum(map(len, part)) >> 4
        elif kinds <= _WORK_SCALARS | _TEXT:
            size += sum([len(x) for x in part if type(x) in _TEXT]) >> 4
        else:
            stack.extend(part)
            pushed = True
    if not pushed:
        flat[id(item)] = size
    return size


def check_work(value: Any) -> Any:
    """``_cmpv_`` (each operand of a comparison) and ``_key_`` (a subscript key): refuse a value
    whose hash or comparison would walk more than MAX_WORK elements. Returns ``value``."""
    cls = type(value)
    if cls is str or cls is int or cls in _WORK_SCALARS or cls is bytes:
        return value
    if isinstance(value, (*_CONTAINERS, *_DICT_VIEWS)):
        charge(len(value), HASH_NS)  # before the estimate, which walks the top level too
        size = work_size(value)
        if size > MAX_WORK:
            raise too_big("comparison/hash work (estimated)", size, MAX_WORK)
        charge(size, SCAN_NS)  # a unit is an item or 16 characters of a string
    return value


def checking(iterable: Any) -> Any:
    """``iterable`` for a C consumer that hashes or compares its items: a container is checked
    as a whole (then consumed at C speed), an iterator item by item (ticking)."""
    if isinstance(iterable, (*_CONTAINERS, *_DICT_VIEWS)):
        check_work(iterable)
        return iterable
    if isinstance(iterable, (range, str, bytes)):  # items are scalars
        return iterable
    return _checking_items(iterable)


def _checking_items(iterable: Any) -> Iterator[Any]:
    tick = limits.tick
    for item in iterable:
        tick()
        yield check_work(item)


def guarded_getitem(obj: Any, key: Any) -> Any:
    """``_getitem_``: ``obj[key]``; a container key (a tuple) is hashed/compared: check it."""
    cls = type(key)
    if cls is not str and cls is not int and cls is not slice:
        check_work(key)
    return obj[key]


def guarded_hash(obj: Any) -> int:
    return hash(check_work(obj))


def checked_key(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``key=`` results are compared in C too (``max(l, key=lambda v: big)``): check them."""
    key = kwargs.get("key")
    if key is not None:
        kwargs["key"] = lambda item: check_work(key(item))
    return kwargs


def _consumer(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A builtin that hashes or compares the items of its arguments (set, sorted, max...)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs = checked_key(kwargs)
        if len(args) == 1:
            if isinstance(args[0], _COPIED):
                charge(len(args[0]), HASH_NS)
            return func(checking(args[0]), **kwargs)
        return func(*[check_work(arg) for arg in args], **kwargs)

    call.__name__ = name
    return call


def _checked_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    if args and not isinstance(args[0], dict):
        return dict(checking(args[0]), **kwargs)
    if args:
        check_work(args[0])
    return dict(*args, **kwargs)


def _checked_method(method: str) -> Callable[..., Any]:
    """``container.method(*args)`` where the method hashes/compares its arguments against the
    container's items (count, index, remove, add, get...): check both."""

    def call(target: Any, *args: Any) -> Any:
        if method in _WALKS_TARGET:
            check_work(target)
        for arg in args:
            check_work(arg)
        return getattr(target, method)(*args)

    call.__name__ = method
    return call


def _checked_sort(target: list[Any], *, key: Any = None, reverse: bool = False) -> None:
    if key is None:
        check_work(target)
    else:
        charge(len(target), HASH_NS)
        key = checked_key({"key": key})["key"]
    target.sort(key=key, reverse=reverse)


_WALKS_TARGET = frozenset({"count", "index", "remove"})
_LIST_WORK = {name: _checked_method(name) for name in ("count", "index", "remove")}
_LIST_WORK["sort"] = _checked_sort
expose(list, ["append", "clear", "copy", "insert", "pop", "reverse"])
expose_checked(list, _LIST_WORK)
expose(tuple, [])
expose_checked(tuple, {name: _checked_method(name) for name in ("count", "index")})
expose(deque, ["append", "appendleft", "clear", "copy", "insert", "maxlen", "pop", "popleft", "reverse",
               "rotate"])
expose_checked(deque, {name: _checked_method(name) for name in ("count", "index", "remove")})
expose(set, [*_SET_READ, "clear", "pop", "symmetric_difference_update"])
expose_checked(set, {name: _checked_method(name) for name in ("add", "discard", "remove")})
_DICT_KEYED = {name: _checked_method(name) for name in ("get", "pop", "setdefault")}
for _cls in (dict, OrderedDict, defaultdict, Counter):
    _names = _ATTRS[_cls] - _DICT_KEYED.keys()
    expose(_cls, _names)
    expose_checked(_cls, _DICT_KEYED)


class _DictType:
    """The hook's ``dict``: a checked constructor that also offers ``dict.fromkeys``."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return _checked_dict(*args, **kwargs)

    def fromkeys(self, iterable: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(checking(iterable), value)

    def __repr__(self) -> str:
        return "<class 'dict'>"


def _checked_dict_update(target: Any, *args: Any, **kwargs: Any) -> None:
    if args:
        other = args[0]
        if isinstance(other, dict):
            check_work(other)
        else:
            other = checking(other)
        target.update(other, **kwargs)
    else:
        target.update(**kwargs)


GUARDED_DICT = _DictType()
expose(_DictType, ["fromkeys"])
for _cls in (dict, OrderedDict, defaultdict, Counter):
    expose(_cls, _ATTRS[_cls] - {"update"})
    expose_checked(_cls, {"update": _checked_dict_update})
_WORK_BUILTINS: dict[str, Any] = {name: _consumer(getattr(builtins, name), name)
                                  for name in ("set", "frozenset", "sorted", "min", "max")}
_WORK_BUILTINS.update(dict=GUARDED_DICT, hash=guarded_hash)
_REAL_TYPES.update({GUARDED_DICT: dict, _WORK_BUILTINS["set"]: set, _WORK_BUILTINS["frozenset"]: frozenset})

"""Classes in hooks: the class-based part of the escape corpus, and what classes may do.

A hook class may define ``__init__`` and ordinary methods (``@staticmethod``, ``@classmethod``,
``@property``), derive from hook classes and exceptions, and nothing else: every special method
C would call (in sorted, heapq, dict/set operations, json.dumps, str.join, the API's own
comparisons, finalizers, error messages built after the run) is refused, so instances compare,
hash and print with object's C defaults. Each entry asserts how the sandbox ends the attempt
(see test_sandbox_corpus.py for the kinds).
"""

from __future__ import annotations

import time

import pytest
from hook_helpers import run

from scriptlb.sandbox.guards import HookClass
from scriptlb.sandbox.limits import HookTimeout

PEER = "\nbalancer.set_current_peer('127.0.0.1:1')\n"
A = "class A:\n    def __init__(self, v=0):\n        self.v = v\n"

# every special method C calls on its own: refused at compile time
_C_CALLED = ["__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__index__",
             "__len__", "__iter__", "__next__", "__str__", "__repr__", "__format__", "__getattr__",
             "__getattribute__", "__setattr__", "__delattr__", "__del__", "__init_subclass__",
             "__set_name__", "__class_getitem__", "__new__", "__call__", "__bool__", "__contains__",
             "__getitem__", "__reduce__", "__reduce_ex__", "__get__", "__set__", "__enter__",
             "__instancecheck__", "__subclasshook__", "__mro_entries__", "__bytes__", "__int__",
             "__float__", "__add__", "__missing__", "__copy__", "__deepcopy__", "__sizeof__",
             "__fspath__"]
COMPILE_ERRORS = {f"defines {name}": (f"class A:\n    def {name}(self, *a):\n        return 1",
                                      f'special method "{name}" is not allowed in hook classes')
                  for name in _C_CALLED}
COMPILE_ERRORS.update({
    "metaclass keyword": ("class M:\n    pass\nclass A(metaclass=M):\n    pass", "class keywords"),
    "init_subclass keyword": ("class A(flag=1):\n    pass", "class keywords"),
    "starred bases": ("bases = ()\nclass A(*bases):\n    pass", "starred base classes"),
    "dunder assigned in body": ("class A:\n    __eq__ = lambda s, o: True",
                                '"__eq__" is an invalid variable'),
    "slots": ("class A:\n    __slots__ = ()", '"__slots__" is an invalid variable name'),
    "__class__ of instance": (A + "A().__class__", '"__class__" is an invalid attribute name'),
    "__mro__": (A + "A.__mro__", '"__mro__" is an invalid attribute name'),
    "__subclasses__": (A + "A.__subclasses__()", '"__subclasses__" is an invalid attribute name'),
    "__bases__ write": (A + "A.__bases__ = ()", '"__bases__" is an invalid attribute name'),
    "__dict__": (A + "A(1).__dict__", '"__dict__" is an invalid attribute name'),
    "object.__reduce__ via instance": (A + "A().__reduce__()", '"__reduce__" is an invalid attribute'),
    "__init__ outside a class": ("def __init__(self):\n    pass", '"__init__" is an invalid variable name'),
    "__init__ nested in an if": ("class A:\n    if True:\n        def __init__(self):\n            pass",
                                 '"__init__" is an invalid variable name'),
    "super().__class__": ("class A:\n    def f(self):\n        return super().__class__",
                          '"__class__" is an invalid attribute name'),
    "super().__self__": ("class A:\n    def f(self):\n        return super().__self__",
                         '"__self__" is an invalid attribute name'),
    "super(A, a).__init__ (two-argument)": (A + "super(A, A()).__init__",
                                            '"__init__" is an invalid attribute'),
    "private class name": ("class _A:\n    pass", '"_A" is an invalid variable name'),
})


@pytest.mark.parametrize(("code", "message"), COMPILE_ERRORS.values(), ids=COMPILE_ERRORS.keys())
def test_compile_errors(code: str, message: str) -> None:
    result = run(code + PEER)
    assert result.kind == "compile_error", result.outcome.message
    assert message in result.outcome.message
    assert result.outcome.addr is None


RUNTIME_ERRORS = {
    # bases: no builtin type can be subclassed (a str subclass would pose as a string)
    # (str, dict, Counter are the sandbox's guarded constructors there: not even types)
    "str subclass": ("class S(str):\n    pass", "TypeError: metaclass conflict"),
    "int subclass": ("class S(int):\n    pass", "not from 'int'"),
    "list subclass": ("class S(list):\n    pass", "TypeError: metaclass conflict"),
    "tuple subclass": ("class S(tuple):\n    pass", "TypeError: metaclass conflict"),
    "dict subclass": ("class S(dict):\n    pass", "TypeError: metaclass conflict"),
    "deque subclass": ("import collections\nclass S(collections.deque):\n    pass", "not from 'deque'"),
    "Counter subclass": ("import collections\nclass S(collections.Counter):\n    pass",
                         "TypeError: metaclass conflict"),
    "API method as a base": ("class S(balancer.set_current_peer):\n    pass",
                             "TypeError: metaclass conflict"),
    "builtin exception outside the list": ("class S(BaseException):\n    pass",
                                           "name 'BaseException' is not"),
    "hook class with a builtin base": ("import collections\nclass B:\n    pass\n"
                                       "class S(B, collections.deque):\n    pass",
                                       "not from 'deque'"),
    "property subclass": ("class S(property):\n    pass", "not from 'property'"),
    "function base": ("def f():\n    pass\nclass S(f):\n    pass", "TypeError: metaclass conflict"),
    "type() is not there": (A + "type(A())", "name 'type' is not defined"),
    "object is not there": ("class A(object):\n    pass", "name 'object' is not defined"),
    "getattr __class__": (A + "getattr(A(), '__class__')", "has no attribute '__class__'"),
    "getattr __mro__": (A + "getattr(A, '__mro__')", "has no attribute '__mro__'"),
    "getattr __subclasses__": (A + "getattr(A, '__subclasses__')", "has no attribute '__subclasses__'"),
    "getattr __init__": (A + "getattr(A, '__init__')", "has no attribute '__init__'"),
    "getattr __reduce_ex__": (A + "getattr(A(), '__reduce_ex__')", "has no attribute '__reduce_ex__'"),
    "type's mro()": (A + "A.mro()", "has no attribute 'mro' visible to hooks"),
    "object's attributes": (A + "getattr(A(), 'mro')", "no attribute 'mro'"),
    "super() of a builtin": ("super(int, 5).real", "no attribute 'real' visible to hooks"),
    "super() reaching object": ("class B:\n    def f(self):\n        return super().mro\nB().f()",
                                "no attribute 'mro' visible to hooks"),
    "super() in a plain function": ("def f():\n    return super().x\nf()", "super(): no arguments"),
    "exception's with_traceback": ("class E(Exception):\n    pass\nE().with_traceback(None)",
                                   "no attribute 'with_traceback'"),
    # C code meeting instances: the defaults of object, or a refusal
    "sorted instances": (A + "sorted([A(1), A(2)])", "TypeError: '<' not supported"),
    "heapq instances": (A + "import heapq\nh = []\nheapq.heappush(h, A())\nheapq.heappush(h, A())",
                        "TypeError: '<' not supported"),
    "max instances": (A + "max(A(), A())", "TypeError: '>' not supported"),
    "json.dumps instance": (A + "import json\njson.dumps(A())", "is not JSON serializable"),
    "str.join instances": (A + "', '.join([A()])", "TypeError"),
    "len instance": (A + "len(A())", "has no len()"),
    "iterate instance": (A + "for x in A():\n    pass", "is not iterable"),
    "index with instance": (A + "[1, 2][A()]", "list indices must be integers"),
    "range of instance": (A + "range(A())", "cannot be interpreted as an integer"),
    # an instance handed to the API is hostile input, never converted
    "peer address instance": (A + "balancer.set_current_peer(A())", "string expected, got A"),
    "peer port instance": (A + "balancer.set_current_peer('127.0.0.1', A())", "number expected, got A"),
    "peer host instance": (A + "balancer.set_current_peer('127.0.0.1:1', host=A())",
                           "string expected, got A"),
    "set_more_tries instance": (A + "balancer.set_more_tries(A())", "number expected, got A"),
    "set_timeouts instance": (A + "balancer.set_timeouts(A())", "bad connect timeout"),
    "enable_keepalive instance": (A + "balancer.set_current_peer('127.0.0.1:1')\n"
                                  "balancer.enable_keepalive(A())", "number expected, got A"),
    "bind_to_local_addr instance": (A + "balancer.bind_to_local_addr(A())", "string expected, got A"),
    "ngx.exit instance": (A + "ngx.exit(A())", "number expected, got A"),
    "ngx.log level instance": (A + "ngx.log(A(), 'x')", "bad log level"),
    "crc32 instance": (A + "ngx.crc32_short(A())", "string expected, got A"),
    "md5 instance": (A + "ngx.md5(A())", "string expected, got A"),
    "ngx.var instance name": (A + "ngx.var[A()]", "bad variable name"),
    "ngx.shared instance name": (A + "ngx.shared[A()]", "bad shared dict name"),
    "chash node instance": (A + "from scriptlb.balancers import chash\nchash([A()])", "node ids are strings"),
    "chash key instance": (A + "from scriptlb.balancers import chash\nchash(['a']).find(A())",
                           "key must be a str or bytes"),
    "roundrobin tried instance": (A + "from scriptlb.balancers import roundrobin\n"
                                  "roundrobin(['a']).find(A())",
                                  "tried must be a set"),
    "class namespace too big": ("class A:\n    x = 1\n" + "".join(f"    m{i} = {i}\n" for i in range(1001)),
                                "class members of 100"),
}


@pytest.mark.parametrize(("code", "message"), RUNTIME_ERRORS.values(), ids=RUNTIME_ERRORS.keys())
def test_runtime_errors(code: str, message: str) -> None:
    started = time.perf_counter()
    result = run(code + PEER)
    assert result.kind == "runtime_error", result.outcome.message
    assert message in result.outcome.message
    assert result.outcome.addr is None
    assert time.perf_counter() - started < 1.0


TIMEOUTS = {
    "__init__ loops": "class A:\n    def __init__(self):\n        while True:\n            pass\nA()",
    "property loops": ("class A:\n    @property\n    def p(self):\n        while True:\n            pass\n"
                       "A().p"),
    "__init__ as sort key": ("class A:\n    def __init__(self, v):\n        while True:\n            pass\n"
                             "sorted([1, 2, 3], key=A)"),
    "__init__ as defaultdict factory": ("import collections\nclass A:\n    def __init__(self):\n"
                                        "        while True:\n            pass\n"
                                        "d = collections.defaultdict(A)\nd['x']"),
    "__init__ in map()": ("class A:\n    def __init__(self, v):\n        while True:\n            pass\n"
                          "list(map(A, [1]))"),
    "deep inheritance": "class B:\n    pass\nwhile True:\n    class B(B):\n        pass",
    "classmethod recursion caught": ("class A:\n    @classmethod\n    def f(cls):\n        try:\n"
                                     "            cls.f()\n        except RecursionError:\n"
                                     "            cls.f()\nA.f()"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("code", TIMEOUTS.values(), ids=TIMEOUTS.keys())
def test_timeouts(code: str) -> None:
    started = time.perf_counter()
    result = run(code + PEER, timeout=0.02)
    assert result.kind == "timeout", result.outcome.message
    assert result.outcome.addr is None
    assert time.perf_counter() - started < 2.0


HARMLESS = {
    "instances as dict keys and set items": A + "d = {A(): 1, A(): 2}\ns = {A(), A()}\nx = len(d) + len(s)",
    "identity comparison": A + "a = A()\nx = (a == a, a == A(), a != A(), a in [a])",
    "str of an instance": A + "x = str(A()) + repr(A)",
    "f-string of an instance": A + "x = f'{A()} {A}'",
    "log an instance": A + "ngx.log(ngx.ERR, A(), A)",
    "instance attributes": A + "a = A(3)\na.w = a.v + 1\nx = a.w",
    "class attribute state": "class C:\n    n = 0\nC.n = C.n + 1\nx = C.n",
    "property setter": ("class A:\n    def __init__(self):\n        self.v = 0\n    @property\n"
                        "    def p(self):\n        return self.v\n    @p.setter\n    def p(self, value):\n"
                        "        self.v = value\n"
                        "a = A()\na.p = 5\nassert a.p == 5"),
    "exception subclass raised and caught": ("class E(KeyError):\n    def __init__(self, k):\n"
                                             "        super().__init__(k)\n        self.k = k\n"
                                             "try:\n    raise E('a')\nexcept KeyError as e:\n"
                                             "    x = (e.k, e.args)"),
    "isinstance": A + "class B(A):\n    pass\nx = isinstance(B(), A) and not isinstance(A(), B)",
    "issubclass": ("class E(ValueError):\n    pass\n"
                   "assert issubclass(E, ValueError) and issubclass(list, list)\n"
                   "assert not issubclass(E, KeyError)"),
    "instance in ngx.ctx": A + "ngx.ctx['a'] = A(1)",
    "json.dumps default=": A + "import json\nx = json.dumps(A(2), default=lambda o: o.v)",
    "sorted with key": A + "x = sorted([A(2), A(1)], key=lambda a: a.v)",
    "getattr with a default": ("class A:\n    @property\n    def p(self):\n        return self.missing\n"
                               "assert getattr(A(), 'p', 0) == 0 and getattr(A(), 'q', 5) == 5\n"
                               "assert hasattr(A, 'p') and not hasattr(A(), 'mro')"),
}


@pytest.mark.parametrize("code", HARMLESS.values(), ids=HARMLESS.keys())
def test_harmless(code: str) -> None:
    result = run(code + PEER)
    assert result.kind is None, result.outcome.message
    assert result.outcome.addr is not None


def test_a_raised_hook_exception_is_reported_with_c_defaults() -> None:
    code = ("class E(Exception):\n    def __init__(self, n):\n"
            "        super().__init__('big', ['x' * 100000] * 1000)\n"
            "raise E(1)")
    result = run(code)
    assert result.kind == "runtime_error"
    assert "E: " in result.outcome.message and len(result.outcome.message) < 5000


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_hook_code_left_behind_cannot_run_after_the_run() -> None:
    """A factory, a property and a method left in ngx.ctx, called by host code after the run:
    each stops at its first budget check, before its body writes anything."""
    code = ("import collections\nclass A:\n    def __init__(self):\n        ngx.ctx['ran'] = 1\n"
            "    @property\n    def p(self):\n        ngx.ctx['ran'] = 2\n        return 1\n"
            "    def m(self):\n        ngx.ctx['ran'] = 3\n"
            "ngx.ctx['d'] = collections.defaultdict(A)\nngx.ctx['a'] = A()\nngx.ctx.pop('ran')\n" + PEER)
    result = run(code)
    assert result.kind is None, result.outcome.message
    ctx = result.ctx
    for later in (lambda: ctx["d"]["k"], lambda: ctx["a"].p, lambda: ctx["a"].m(), lambda: type(ctx["a"])()):
        with pytest.raises(HookTimeout):
            later()
    assert "ran" not in ctx


def test_hook_classes_are_hook_class_instances() -> None:
    result = run(A + "ngx.ctx['cls'] = A\nclass E(ValueError):\n    pass\nngx.ctx['e'] = E" + PEER)
    assert type(result.ctx["cls"]) is HookClass and type(result.ctx["e"]) is HookClass
    with pytest.raises(TypeError):
        HookClass("S", (str,), {})
    with pytest.raises(TypeError):
        HookClass("S", (), {"__eq__": lambda a, b: True})


class _HostMadeStr(str):
    """A str subclass (hook code cannot make one; host code could hand one over by mistake)."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("called")

    __hash__ = str.__hash__


@pytest.mark.parametrize("expr", [
    "balancer.set_current_peer(S('127.0.0.1:1'))",
    "balancer.set_current_peer('127.0.0.1:1', host=S('a'))",
    "balancer.set_current_peer('127.0.0.1', S('80'))",
    "balancer.bind_to_local_addr(S('127.0.0.1'))",
    "ngx.crc32_short(S('a'))",
    "chash([S('a')])",
    "chash(['a']).find(S('k'))",
])
def test_a_str_subclass_is_not_a_string_to_the_api(expr: str) -> None:
    from scriptlb.hookrt import hooks

    hooks.BUILTINS["S"] = _HostMadeStr
    try:
        result = run("from scriptlb.balancers import chash\n" + expr + PEER)
    finally:
        del hooks.BUILTINS["S"]
    assert result.kind == "runtime_error", result.outcome.message
    assert "TypeError" in result.outcome.message and "_HostMadeStr" in result.outcome.message

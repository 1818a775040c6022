"""The compiler policy: RestrictedPython's transformer plus scriptlb's own rewrites.

On top of RestrictedPython (no ``_`` names, guarded attribute/item access, no ``exec``/``eval``,
no ``try/except*``, no ``async``, no ``match``), this policy:

* plants ``_tick_()`` (the CPU budget check, see limits.py) at the top of every function and
  loop body, every ``except`` handler and ``finally`` block, in every lambda and in every
  comprehension element, so a stopped run cannot be resumed by hook code;
* routes ``+ * ** << %`` through size-checking guards, f-string fields through ``_format_``
  (format-spec widths) or ``_text_`` (the text of a container), and f-strings and starred
  displays through ``_check_size_``;
* lets ``class`` statements through as ``HookClass`` instances (guards.py says what they may
  hold): no class keywords, no special method but ``__init__``, no other dunder function name;
  ``super().__init__`` is the one private attribute read (compiled to ``_super_init_``).

``compile_hook`` returns a code object or raises ``HookCompileError`` with the line number.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from types import CodeType
from typing import TYPE_CHECKING, TypeVar

from RestrictedPython.transformer import RestrictingNodeTransformer, copy_locations

if TYPE_CHECKING:
    from RestrictedPython._types import T_pos_ast  # what copy_locations and check_name take


class HookCompileError(Exception):
    """A syntax or policy error; ``lineno`` is in the hook's own numbering (file or conf)."""

    def __init__(self, message: str, lineno: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno


_GUARDED_BINOPS: dict[type, str] = {
    ast.Add: "_add_",
    ast.Mult: "_mul_",
    ast.Pow: "_pow_",
    ast.LShift: "_lshift_",
    ast.Mod: "_mod_",
}


# the nodes _call copies a position from (RestrictedPython's copy_locations)
_Located = ast.expr | ast.stmt | ast.excepthandler
_Node = TypeVar("_Node", bound=ast.AST)
# what a RestrictedPython visitor returns (as ast.NodeTransformer's: a node, nodes, or None)
_Visited = ast.AST | Iterable[ast.AST] | None


def _in_place(node: _Node, visited: _Visited) -> _Node:
    """``node`` after RestrictedPython's visitor of its kind, which transforms it in place and
    returns it; one that replaced it would bypass the guards added here, so that is an error."""
    if visited is not node:
        raise TypeError(f"RestrictedPython replaced a {type(node).__name__} node")
    return node


def _call(name: str, args: list[ast.expr], like: _Located) -> ast.Call:
    node = ast.Call(func=ast.Name(name, ast.Load()), args=args, keywords=[])
    copy_locations(node, like)
    copy_locations(node.func, like)
    return node


def _is_plain_constant(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(isinstance(elt, ast.Constant) for elt in node.elts)
    return False


def _work_checked(node: ast.expr, guard: str = "_cmpv_") -> ast.expr:
    """``guard(node)``, unless ``node`` is a constant (or a display of constants)."""
    if _is_plain_constant(node):
        return node
    return _call(guard, [node], node)


def _hashed(elt: ast.expr) -> ast.expr:
    """A set display item: ``_key_(item)``, or ``*_items_(iterable)`` for a starred one."""
    if isinstance(elt, ast.Starred):
        elt.value = _call("_items_", [elt.value], elt.value)
        return elt
    return _work_checked(elt, "_key_")


def _tick_stmt(like: _Located) -> ast.Expr:
    stmt = ast.Expr(_call("_tick_", [], like))
    copy_locations(stmt, like)
    return stmt


# The API globals every run gets. Attribute reads on them skip ``_getattr_`` when the module
# never rebinds the name (see ``_rebound_names``): every public attribute of those objects is
# API by construction (api.py keeps internals behind ``_``), so the guard would only cost time.
# One level deeper is direct too for the namespaces below, e.g. ``ngx.var.uri``. So are reads on
# names only ever bound by ``import`` (``_module_names``): ``picker.pick``, ``zlib.crc32``.
API_GLOBALS = frozenset({"ngx", "balancer", "upstream"})
_API_NAMESPACES = frozenset({"var", "shared", "worker", "req", "balancer", "upstream"})


def _rebound_names(tree: ast.AST) -> set[str]:
    """Names the code binds anywhere: assignments, parameters, imports, handlers, del..."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.partition(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return bound


def _is_flat_tuple(target: ast.expr) -> bool:
    """``a, b`` (names only: nothing nested, no starred name)."""
    return (isinstance(target, ast.Tuple) and bool(target.elts)
            and all(isinstance(elt, ast.Name) for elt in target.elts))


def _module_names(tree: ast.AST) -> set[str]:
    """Names bound only by ``import x`` / ``import x as y``: each holds a module stand-in
    (scriptlb.sandbox.importer: a ``SafeModule``, a ``PackageModule`` or an API namespace), whose
    public attributes are all its members, read-only, so ``x.name`` needs no ``_getattr_``."""
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.asname or alias.name.partition(".")[0] for alias in node.names)
    if not imported:
        return imported
    other: set[str] = set()  # bound some other way somewhere (from-import, assignment, argument...)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            other.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            other.add(node.id)
        elif isinstance(node, ast.arg):
            other.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            other.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            other.update(node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            other.add(node.name)
    return imported - other


# --------------------------------------------------------------------------- known numbers
#
# ``_mod_`` exists for %-formatting (a str or bytes on the left) and ``_getitem_`` for keys
# whose hash or comparison walks a container. Where the code itself shows that the left
# operand of ``%`` or a subscript's key is a number, neither guard has anything to check, and
# the plain operation is compiled (a guard is a Python call: the usual ``peers[crc % n]`` of a
# balancer hook pays two per run otherwise). A number here is:
# * an int or float literal;
# * a call of a function that returns only ints, by a name that means that function wherever it
#   is read (never bound anywhere in the module): the builtins below, ``ngx.crc32_short``/
#   ``crc32_long`` (``ngx`` never rebound) and zlib's checksums (a name only ever bound by
#   ``import zlib``: the allow-listed stand-in, which no module on python_package_path can
#   shadow);
# * ``-x``/``+x`` or ``x % y`` of a number ``x`` (int or float arithmetic: never formatting);
# * a name bound exactly once in the whole module, by ``name = <a number>``: wherever it is
#   read it holds that number, or it is unbound (an error), or it reads a builtin or API global
#   of that name, none of which is a str, bytes or container.

_INT_BUILTINS = frozenset({"len", "hash", "ord"})
_INT_API = frozenset({"crc32_short", "crc32_long"})  # ngx.X
_INT_MODULE_FUNCTIONS = {"zlib": frozenset({"crc32", "adler32"})}
_NUMBER_TYPES = (int, float)


def _binding_counts(tree: ast.AST) -> dict[str, int]:
    """How many places bind each name, in any scope (``global``/``nonlocal`` count twice: a
    name declared so is never a known number)."""
    counts: dict[str, int] = {}

    def bind(name: str, times: int = 1) -> None:
        counts[name] = counts.get(name, 0) + times

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bind(node.id)
        elif isinstance(node, ast.arg):
            bind(node.arg)
        elif isinstance(node, ast.alias):
            bind(node.asname or node.name.partition(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bind(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                bind(name, 2)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(node.name)
    return counts


def _imported_modules(tree: ast.AST, module_names: set[str]) -> dict[str, str]:
    """name -> module, for the names only ever bound by ``import module [as name]``, always
    of the same module."""
    modules: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                modules.setdefault(bound, set()).add(alias.name if alias.asname else bound)
    return {name: next(iter(found)) for name, found in modules.items()
            if name in module_names and len(found) == 1}


class _Numbers:
    """Which expressions of one module are known numbers (see above)."""

    def __init__(self, tree: ast.Module, direct_names: frozenset[str] | set[str],
                 module_names: set[str]) -> None:
        self.bindings = _binding_counts(tree)
        self.ngx = "ngx" in direct_names
        self.modules = _imported_modules(tree, module_names)
        self.names: set[str] = set()
        single = [node for node in ast.walk(tree) if isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name) and self.bindings.get(node.targets[0].id) == 1]
        changed = True
        while changed:  # `j = i % 3` after `i = len(x)`: until nothing more is known
            changed = False
            for assign in single:
                name = assign.targets[0].id  # type: ignore[attr-defined]  # (a Name: see single)
                if name not in self.names and self.is_number(assign.value):
                    self.names.add(name)
                    changed = True

    def is_number(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return type(node.value) in _NUMBER_TYPES
        if isinstance(node, ast.Name):
            return node.id in self.names
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, (ast.USub, ast.UAdd)) and self.is_number(node.operand)
        if isinstance(node, ast.BinOp):
            return isinstance(node.op, ast.Mod) and self.is_number(node.left)
        if isinstance(node, ast.Call):
            return self._int_function(node.func)
        return False

    def _int_function(self, func: ast.expr) -> bool:
        if isinstance(func, ast.Name):
            return func.id in _INT_BUILTINS and func.id not in self.bindings
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            return False
        owner = func.value.id
        if owner == "ngx":
            return self.ngx and func.attr in _INT_API
        return func.attr in _INT_MODULE_FUNCTIONS.get(self.modules.get(owner, ""), ())


def _is_plain_key(node: ast.expr) -> bool:
    """A literal subscript key that is no container: str, bytes, a number, None..."""
    return isinstance(node, ast.Constant) and not isinstance(node.value, (tuple, frozenset))


def _is_super_init(node: ast.Attribute) -> bool:
    """``super().__init__`` (zero-argument super only)."""
    call = node.value
    return (node.attr == "__init__" and isinstance(node.ctx, ast.Load) and isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name) and call.func.id == "super" and not call.args
            and not call.keywords)


class HookPolicy(RestrictingNodeTransformer):
    """RestrictedPython's policy, tightened for untrusted balancer hooks."""

    def __init__(self, errors: list[str], warnings: list[str], used_names: dict[str, bool]) -> None:
        super().__init__(errors, warnings, used_names)
        self.error_lines: list[tuple[int | None, str]] = []
        self.direct_names: frozenset[str] | set[str] = frozenset()
        self._class_inits: set[int] = set()  # ids of the `def __init__` nodes of class bodies
        self.numbers: _Numbers | None = None

    def visit_Module(self, node: ast.Module) -> _Visited:
        module_names = _module_names(node)
        self.direct_names = (API_GLOBALS - _rebound_names(node)) | module_names
        self.numbers = _Numbers(node, self.direct_names, module_names)
        return super().visit_Module(node)

    def _is_number(self, node: ast.expr) -> bool:
        return self.numbers is not None and self.numbers.is_number(node)

    # ---------------------------------------------------------------- direct API access

    def _is_direct(self, node: ast.expr) -> bool:
        """``ngx.X``, ``balancer.X``, ``upstream.X`` and ``ngx.var.X``-style reads."""
        if not isinstance(node, ast.Attribute) or node.attr.startswith("_"):
            return False
        value = node.value
        if isinstance(value, ast.Name):
            return value.id in self.direct_names
        return (isinstance(value, ast.Attribute) and value.attr in _API_NAMESPACES
                and isinstance(value.value, ast.Name) and value.value.id == "ngx"
                and "ngx" in self.direct_names)

    def _is_variable(self, node: ast.Attribute) -> bool:
        """``ngx.var.NAME`` read directly (``_is_direct``)."""
        value = node.value
        return (isinstance(value, ast.Attribute) and value.attr == "var"
                and isinstance(value.value, ast.Name) and value.value.id == "ngx")

    def visit_Attribute(self, node: ast.Attribute) -> _Visited:
        if _is_super_init(node):
            return _call("_super_init_", [self.visit(node.value)], node)
        if isinstance(node.ctx, ast.Load) and self._is_direct(node):
            if self._is_variable(node):
                # the variable itself, as ngx.var's attribute read answers it (the runtime's
                # _var_), without the attribute protocol's lookup around that answer
                return _call("_var_", [ast.Constant(node.attr)], node)
            node.value = self.visit(node.value)  # a Name, or a direct Attribute: left plain
            return node
        return super().visit_Attribute(node)

    def visit_Call(self, node: ast.Call) -> _Visited:
        """``text.encode()`` (no arguments, not an API or module member): ``_encode_(text)``,
        the guarded method's answer in one call (guards.encoded)."""
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "encode" and isinstance(func.ctx, ast.Load)
                and not node.args and not node.keywords and not self._is_direct(func)):
            return _call("_encode_", [self.visit(func.value)], node)
        return super().visit_Call(node)

    def error(self, node: ast.AST, info: str) -> None:
        super().error(node, info)
        self.error_lines.append((getattr(node, "lineno", None), info))

    # ---------------------------------------------------------------- refusals

    def visit_ClassDef(self, node: ast.ClassDef) -> _Visited:
        if node.keywords:
            self.error(node, "class keywords (metaclass=...) are not allowed in hooks.")
        if any(isinstance(base, ast.Starred) for base in node.bases):
            self.error(node, "starred base classes are not allowed in hooks.")
        for stmt in node.body:
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if stmt.name == "__init__":
                self._class_inits.add(id(stmt))
            elif stmt.name.startswith("__") and stmt.name.endswith("__"):
                self.error(stmt, f'special method "{stmt.name}" is not allowed in hook classes (only '
                           "__init__): C code would call it outside the hook's control.")
        return super().visit_ClassDef(node)

    def check_name(self, node: T_pos_ast, name: str | None, allow_magic_methods: bool = False) -> None:
        # RestrictedPython lets a few dunder method names through for classes; hooks get only
        # __init__, and only as a method directly in a class body.
        if name == "__init__" and id(node) in self._class_inits:
            return
        super().check_name(node, name, allow_magic_methods=False)

    # ---------------------------------------------------------------- unpacking

    def visit_Assign(self, node: ast.Assign) -> _Visited:
        """``ok, err = balancer.set_current_peer(...)``: unpacking into plain names is left to
        the interpreter, which pulls at most one item more than there are names (RestrictedPython's
        ``_unpack_sequence_`` would list the whole iterable first, then unpack the same way)."""
        if len(node.targets) == 1 and _is_flat_tuple(node.targets[0]):
            return self.node_contents_visit(node)
        return super().visit_Assign(node)

    def guard_iter(self, node: ast.For | ast.comprehension) -> _Visited:
        """``for key, value in ...``: plain names need no per-item ``_iter_unpack_sequence_``."""
        if not _is_flat_tuple(node.target):
            return super().guard_iter(node)
        node = _in_place(node, self.node_contents_visit(node))
        node.iter = _call("_getiter_", [node.iter], node.iter)
        return node

    # ---------------------------------------------------------------- budget ticks

    def visit_FunctionDef(self, node: ast.FunctionDef) -> _Visited:
        node = _in_place(node, super().visit_FunctionDef(node))
        node.body.insert(0, _tick_stmt(node))
        return node

    def visit_Lambda(self, node: ast.Lambda) -> _Visited:
        node = _in_place(node, super().visit_Lambda(node))
        body = ast.BoolOp(op=ast.Or(), values=[_call("_tick_", [], node.body), node.body])
        copy_locations(body, node.body)
        node.body = body
        return node

    def visit_For(self, node: ast.For) -> _Visited:
        node = _in_place(node, super().visit_For(node))
        node.body.insert(0, _tick_stmt(node))
        return node

    def visit_While(self, node: ast.While) -> _Visited:
        node = _in_place(node, super().visit_While(node))
        node.body.insert(0, _tick_stmt(node))
        return node

    def visit_comprehension(self, node: ast.comprehension) -> _Visited:
        node = _in_place(node, super().visit_comprehension(node))
        check = ast.UnaryOp(op=ast.Not(), operand=_call("_tick_", [], node.iter))
        copy_locations(check, node.iter)
        node.ifs.insert(0, check)
        return node

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> _Visited:
        node = _in_place(node, super().visit_ExceptHandler(node))
        node.body.insert(0, _tick_stmt(node))
        return node

    def visit_Try(self, node: ast.Try) -> _Visited:
        node = _in_place(node, super().visit_Try(node))
        if node.finalbody:
            node.finalbody.insert(0, _tick_stmt(node.finalbody[0]))
        return node

    # ---------------------------------------------------------------- work guards

    def visit_Compare(self, node: ast.Compare) -> _Visited:
        """``a == b``, ``a < b``, ``a in b``: each operand through ``_cmpv_`` (guards.check_work),
        which refuses containers whose comparison or hash would walk too many elements."""
        node = _in_place(node, super().visit_Compare(node))
        if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return node
        node.left = _work_checked(node.left)
        node.comparators = [_work_checked(c) for c in node.comparators]
        return node

    def visit_Subscript(self, node: ast.Subscript) -> _Visited:
        """``d[key] = v`` / ``del d[key]``: the key is hashed or compared; ``_key_`` checks it
        (loads go through ``_getitem_``, which checks it too)."""
        if isinstance(node.ctx, ast.Load) and (_is_plain_key(node.slice) or self._is_number(node.slice)):
            return self.node_contents_visit(node)  # nothing for _getitem_ to check (known numbers)
        visited = super().visit_Subscript(node)  # a load becomes a _getitem_ call
        if isinstance(visited, ast.Subscript) and not isinstance(visited.slice, ast.Slice):
            visited.slice = _work_checked(visited.slice, "_key_")
        return visited

    def visit_Set(self, node: ast.Set) -> _Visited:
        """``{a, b, *c}``: the items are hashed."""
        node = _in_place(node, super().visit_Set(node))
        node.elts = [_hashed(elt) for elt in node.elts]
        return node

    def visit_Dict(self, node: ast.Dict) -> _Visited:
        """``{k: v, **d}``: the keys are hashed (``**d`` reuses d's stored hashes)."""
        node = _in_place(node, super().visit_Dict(node))
        node.keys = [key if key is None else _work_checked(key, "_key_") for key in node.keys]
        return node

    def visit_SetComp(self, node: ast.SetComp) -> _Visited:
        node = _in_place(node, super().visit_SetComp(node))
        node.elt = _work_checked(node.elt, "_key_")
        return node

    def visit_DictComp(self, node: ast.DictComp) -> _Visited:
        node = _in_place(node, super().visit_DictComp(node))
        node.key = _work_checked(node.key, "_key_")
        return node

    # ---------------------------------------------------------------- size guards

    def visit_BinOp(self, node: ast.BinOp) -> _Visited:
        number_mod = isinstance(node.op, ast.Mod) and self._is_number(node.left)  # (before the visit)
        node = _in_place(node, super().visit_BinOp(node))
        guard = _GUARDED_BINOPS.get(type(node.op))
        if guard is None or number_mod:  # a number % anything: arithmetic (known numbers)
            return node
        return _call(guard, [node.left, node.right], node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> _Visited:
        node = _in_place(node, super().visit_JoinedStr(node))
        return _call("_check_size_", [node], node)

    def visit_FormattedValue(self, node: ast.FormattedValue) -> _Visited:
        node = _in_place(node, super().visit_FormattedValue(node))
        if node.format_spec is None:
            # {value}: the value's text is built in C; _text_ refuses one that would be huge
            node.value = _call("_text_", [node.value], node.value)
            return node
        spec = node.format_spec
        field = _call("_format_", [node.value, spec, ast.Constant(node.conversion)], node)
        copy_locations(field.args[2], node)
        return ast.FormattedValue(value=field, conversion=-1, format_spec=None,
                                  lineno=node.lineno, col_offset=node.col_offset,
                                  end_lineno=node.end_lineno, end_col_offset=node.end_col_offset)

    def _starred_display(self, node: ast.List | ast.Tuple) -> ast.expr:
        if any(isinstance(elt, ast.Starred) for elt in node.elts) and isinstance(node.ctx, ast.Load):
            return _call("_check_size_", [node], node)
        return node

    def visit_List(self, node: ast.List) -> _Visited:
        return self._starred_display(_in_place(node, super().visit_List(node)))

    def visit_Tuple(self, node: ast.Tuple) -> _Visited:
        return self._starred_display(_in_place(node, super().visit_Tuple(node)))


# The function a hook's top-level code is compiled into (``compile_hook(..., body_names=...)``):
# hook code cannot spell the name, so a module defining it is the wrapper.
HOOK_FUNCTION = "__hook__"


def compile_hook(source: str, filename: str, first_line: int = 1,
                 body_names: frozenset[str] | None = None) -> CodeType:
    """Compile hook (or hook module) source under the policy.

    ``first_line`` is the line of ``source``'s first line in ``filename`` (a config block's
    body starts inside the config file), so tracebacks and errors carry the real line.

    With ``body_names`` (the names a run's globals provide: builtins and API), a hook whose
    top-level code can run as a function body without a visible difference is compiled as a
    module defining ``HOOK_FUNCTION()``: a run calls it, and its top-level names are that
    call's locals, fresh on every run like a module's fresh globals, at a fraction of the
    cost (a module body looks every name up in up to three dicts, and a fresh dict per run
    defeats the interpreter's global caches). See ``_runs_as_function`` for the exceptions.
    """
    try:
        return _compile(source, filename, first_line, body_names)
    except SyntaxError as err:
        lineno = (err.lineno or 1) + first_line - 1
        raise HookCompileError(f"{type(err).__name__}: {err.msg}", lineno) from None
    except (RecursionError, MemoryError, ValueError) as err:
        # e.g. 1+1+...+1 a hundred thousand times: too deep for the parser or the transformer
        raise HookCompileError(f"{type(err).__name__}: {err}", first_line) from None


def _compile(source: str, filename: str, first_line: int, body_names: frozenset[str] | None) -> CodeType:
    tree = ast.parse(source, filename, "exec")
    if first_line != 1:
        ast.increment_lineno(tree, first_line - 1)
    as_function = body_names is not None and _runs_as_function(tree, body_names)
    errors: list[str] = []
    policy = HookPolicy(errors, [], {})
    tree = policy.visit(tree)
    if policy.error_lines:
        lineno, info = policy.error_lines[0]
        raise HookCompileError(f"SandboxError: {info}", lineno)
    ast.fix_missing_locations(tree)
    code = compile(tree, filename, "exec", dont_inherit=True)  # a module's errors (return, yield...)
    if not as_function:
        return code
    return compile(_as_function(tree), filename, "exec", dont_inherit=True)


def _runs_as_function(tree: ast.Module, body_names: frozenset[str]) -> bool:
    """Whether the top-level code behaves the same as a function body. Not when it uses
    ``global`` (it would reach the runner's lasting globals), rebinds a name the globals
    provide (read before its binding, a local is unbound, a global is not), or has a class
    body binding a name the hook binds too (a class body reads the names it binds from its
    own dict and the globals, never from the function around it)."""
    top = _scope_bindings(tree.body)
    if not top.isdisjoint(body_names):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            return False
        if isinstance(node, ast.ClassDef) and not _scope_bindings(node.body).isdisjoint(top):
            return False
    return True


def _scope_bindings(body: list[ast.stmt]) -> set[str]:
    """The names ``body`` binds in its own scope: not inside the functions, lambdas and classes
    it defines (their names only). Comprehension targets count (a walrus in one binds here)."""
    names: set[str] = set()
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.partition(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _as_function(tree: ast.Module) -> ast.Module:
    """``def HOOK_FUNCTION(): <the module's statements>`` (the policy has transformed them)."""
    body: list[ast.stmt] = list(tree.body) or [ast.Pass()]
    function = ast.FunctionDef(name=HOOK_FUNCTION, args=ast.arguments([], [], None, [], [], None, []),
                               body=body, decorator_list=[], returns=None, type_comment=None)
    function.lineno = getattr(body[0], "lineno", 1)  # (an empty hook's Pass has no position)
    function.col_offset = 0
    function.end_lineno = max(getattr(stmt, "end_lineno", None) or function.lineno for stmt in body)
    function.end_col_offset = 0
    module = ast.Module([function], [])
    ast.fix_missing_locations(module)
    return module

"""Safe, vectorised evaluation of the small expressions in device models.

Device models carry derived fields (``voltage * current``), event conditions
(``temperature > 28``) and command effects (``payload.value + 1``) as one-line,
Python-syntax expressions. They are evaluated for a batch of devices at once: each name
in the environment is bound either to a numpy array with one element per device (all of
the same length) or to a plain value (a number, a string, or a command's payload as a
mapping), so one evaluation serves every device that shares the model.

Design
------
Nothing here runs ``eval``, ``exec`` or ``compile``. :func:`compile_expression` parses
the source with :func:`ast.parse`, checks every node against the whitelist below and
turns the tree into nested closures, one per node, built once. Calling the resulting
:class:`Expression` runs the closures and walks no AST. Whatever the syntax decides
(which operator, which function, how many arguments, which key) is decided at compile
time; what is left for run time depends on the values: whether an operand is an array
(``and``, ``or``, ``not``, ``if``-``else``, ``in``, the conversions), whether a payload
is a mapping, and the division and resource checks.

Whitelist
---------
- literals ``int``, ``float``, ``str``, ``bool`` and ``None``; a tuple or list of them
  only as the right side of ``in`` / ``not in``;
- names bound in the environment, and :data:`CONSTANTS` (``pi``, ``e``, ``inf``), which
  take precedence over the environment and are not reported in ``Expression.names``;
- arithmetic ``+ - * / // % **``, bitwise ``& | ^ ~ << >>`` (binary payloads carry
  flags), unary ``-``, ``+`` and ``not``;
- comparisons ``== != < <= > >=``, elementwise and chainable (``0 < x <= 5``), and
  ``in`` / ``not in`` a literal tuple or list (:func:`numpy.isin` for arrays);
- ``and`` / ``or``, elementwise (:func:`numpy.logical_and` / :func:`numpy.logical_or`;
  a Python ``bool`` when no operand is an array); every operand is evaluated, so a
  scalar and a batch evaluation fail or succeed alike;
- ``a if cond else b``: :func:`numpy.where` (both branches evaluated) when ``cond`` is an
  array, a plain conditional otherwise;
- calls of :data:`FUNCTIONS` with positional arguments, their count checked at compile
  time;
- ``name.key`` and ``name["key"]`` where ``name`` is a bare name bound to a mapping (a
  command's JSON payload) and ``key`` does not start with ``_``.

Anything else is rejected at compile time by an :class:`~iotix.errors.ExpressionError`
that names the construct: other attribute access or subscripts, calls of anything else,
keyword and starred arguments, lambdas, comprehensions, ``:=``, f-strings, dict and set
displays, slices, ``is``, ``@``; so are empty sources, sources over 1,000 characters and
trees nested more than 100 levels deep.

Evaluation
----------
Floating-point arithmetic follows IEEE 754 as numpy does, without warnings: ``sqrt(-1)``
is ``nan`` and overflow is ``inf``. Division by zero is the exception: ``/``, ``//`` and
``%`` raise when a zero divisor meets a finite dividend, for arrays (where numpy would
quietly give ``inf``, ``nan`` or, for integers, ``0``) as for Python numbers. Integer
``**`` and ``<<`` are bounded (exponent and shift at most 64, a power at most 4,096
bits), and repeating or ``%``-formatting a string or list is refused, so no expression
can exhaust memory. Every failure, at compile time or while evaluating, is an
:class:`~iotix.errors.ExpressionError` whose ``expression`` is the source.
"""

from __future__ import annotations

import ast
import difflib
import functools
import math
import operator
from collections.abc import Callable, Collection, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeAlias, final

import numpy as np
import numpy.typing as npt

from iotix.errors import ExpressionError

__all__ = ["CONSTANTS", "FUNCTIONS", "Expression", "compile_expression"]

_Evaluator: TypeAlias = Callable[[Mapping[str, Any]], Any]
_BinaryOperation: TypeAlias = Callable[[Any, Any], Any]

_MAX_SOURCE_CHARS: Final = 1_000
_MAX_NESTING_LEVELS: Final = 100
_MAX_INT_EXPONENT: Final = 64
_MAX_INT_POWER_BITS: Final = 4_096
_MAX_SHIFT_BITS: Final = 64
# Longer source fragments are shortened in error messages.
_SNIPPET_CHARS: Final = 60
# Floats at or beyond 2**63 in magnitude (and nan) have no int64 value.
_INT64_BOUND: Final = 2.0**63
# Operands that `*` would repeat and `%` would format: both can build huge values.
_SEQUENCE_TYPES: Final = (str, bytes, list, tuple)
# The results the division check inspects; Python numbers raise ZeroDivisionError.
_NUMPY_TYPES: Final = (np.ndarray, np.generic)
# What a failing evaluation may raise; all of it becomes an ExpressionError. numpy
# reports some unsupported object operands as AttributeError (`np.sqrt({})`).
_EVALUATION_ERRORS: Final = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError)

CONSTANTS: Final[Mapping[str, float]] = MappingProxyType(
    {"pi": math.pi, "e": math.e, "inf": math.inf}
)


def _minimum(*values: Any) -> Any:
    """``min(a, b, ...)``: the elementwise minimum; nan propagates."""
    return functools.reduce(np.minimum, values)


def _maximum(*values: Any) -> Any:
    """``max(a, b, ...)``: the elementwise maximum; nan propagates."""
    return functools.reduce(np.maximum, values)


def _round(value: Any, ndigits: Any = 0) -> Any:
    """``round(x)`` / ``round(x, ndigits)``: half to even, as Python rounds."""
    return np.round(value, ndigits)


def _to_int(value: Any) -> Any:
    """``int(x)``: truncate toward zero; int64 for arrays, Python int otherwise."""
    if isinstance(value, np.ndarray):
        # astype would turn nan, inf and out-of-range floats into garbage; Python's
        # int() raises for them, and so does this.
        if value.dtype.kind == "f" and not np.all(np.abs(value) < _INT64_BOUND):
            msg = "int() of nan, inf or a value outside the int64 range"
            raise ValueError(msg)
        return value.astype(np.int64)
    return int(value)


def _to_float(value: Any) -> Any:
    """``float(x)``: float64 for arrays, Python float otherwise."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return float(value)


def _to_bool(value: Any) -> Any:
    """``bool(x)``: a bool array for arrays, Python bool otherwise."""
    if isinstance(value, np.ndarray):
        return value.astype(np.bool_)
    return bool(value)


# The callable whitelist: name -> (implementation, fewest arguments, most arguments;
# None for no limit). numpy functions serve scalars and arrays alike, so a scalar result
# may be a numpy scalar. Argument counts are checked at compile time.
_FUNCTION_TABLE: Final[Mapping[str, tuple[Callable[..., Any], int, int | None]]] = {
    "abs": (np.abs, 1, 1),
    "min": (_minimum, 2, None),
    "max": (_maximum, 2, None),
    "round": (_round, 1, 2),
    "floor": (np.floor, 1, 1),  # floats, unlike math.floor
    "ceil": (np.ceil, 1, 1),  # floats, unlike math.ceil
    "sqrt": (np.sqrt, 1, 1),
    "exp": (np.exp, 1, 1),
    "log": (np.log, 1, 1),  # natural logarithm
    "log10": (np.log10, 1, 1),
    "sin": (np.sin, 1, 1),  # radians, as are cos, tan and atan2
    "cos": (np.cos, 1, 1),
    "tan": (np.tan, 1, 1),
    "atan2": (np.arctan2, 2, 2),  # atan2(y, x)
    "hypot": (np.hypot, 2, 2),
    "degrees": (np.degrees, 1, 1),
    "radians": (np.radians, 1, 1),
    "clip": (np.clip, 3, 3),  # clip(x, lo, hi)
    "int": (_to_int, 1, 1),
    "float": (_to_float, 1, 1),
    "bool": (_to_bool, 1, 1),
}

FUNCTIONS: Final[Mapping[str, Callable[..., Any]]] = MappingProxyType(
    {name: entry[0] for name, entry in _FUNCTION_TABLE.items()}
)


def _checked_quotient(dividend: Any, divisor: Any, quotient: Any) -> Any:
    """Return ``quotient`` unless numpy produced it by dividing a finite value by zero.

    Python numbers raise ZeroDivisionError by themselves; numpy gives ``inf`` or ``nan``
    for floats and ``0`` for integers, which would flow on unnoticed.
    """
    if isinstance(quotient, _NUMPY_TYPES):
        kind = quotient.dtype.kind
        if kind in "fc":
            # A finite value divided by zero is never finite, so a finite result (the
            # usual case) needs one pass and no more.
            if np.isfinite(quotient).all():
                return quotient
            by_zero = np.logical_and(np.equal(divisor, 0), np.isfinite(dividend))
        elif kind in "iu":
            by_zero = np.equal(divisor, 0)
        else:
            return quotient
        if by_zero.any():
            msg = "division by zero"
            raise ZeroDivisionError(msg)
    return quotient


def _true_divide(left: Any, right: Any) -> Any:
    return _checked_quotient(left, right, left / right)


def _floor_divide(left: Any, right: Any) -> Any:
    return _checked_quotient(left, right, left // right)


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, _SEQUENCE_TYPES):
        msg = "formatting a string with '%' is not allowed"
        raise TypeError(msg)
    return _checked_quotient(left, right, left % right)


def _multiply(left: Any, right: Any) -> Any:
    if isinstance(left, _SEQUENCE_TYPES) or isinstance(right, _SEQUENCE_TYPES):
        msg = "repeating a string or list with '*' is not allowed"
        raise TypeError(msg)
    return left * right


def _power(base: Any, exponent: Any) -> Any:
    # Only Python ints grow without bound; numpy integers wrap and floats overflow to
    # inf or raise OverflowError.
    if isinstance(base, int) and isinstance(exponent, int):
        if exponent > _MAX_INT_EXPONENT:
            msg = f"integer exponent {exponent} is too large (at most {_MAX_INT_EXPONENT})"
            raise OverflowError(msg)
        if exponent > 0 and abs(base).bit_length() * exponent > _MAX_INT_POWER_BITS:
            msg = f"integer power would exceed {_MAX_INT_POWER_BITS} bits"
            raise OverflowError(msg)
    return base**exponent


def _left_shift(value: Any, bits: Any) -> Any:
    if isinstance(value, int) and isinstance(bits, int) and bits > _MAX_SHIFT_BITS:
        msg = f"shifting an integer left by {bits} bits is not allowed (at most {_MAX_SHIFT_BITS})"
        raise OverflowError(msg)
    return value << bits


def _logical_not(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.logical_not(value)
    return not value


def _all_true(values: list[Any]) -> Any:
    """Elementwise ``and`` of every value; a Python bool when none is an array."""
    if any(isinstance(value, np.ndarray) for value in values):
        return functools.reduce(np.logical_and, values)
    return all(values)


def _any_true(values: list[Any]) -> Any:
    """Elementwise ``or`` of every value; a Python bool when none is an array."""
    if any(isinstance(value, np.ndarray) for value in values):
        return functools.reduce(np.logical_or, values)
    return any(values)


# Binary operators. `/ // %` check for division by zero, `* %` refuse to repeat or
# format sequences, `** <<` bound integer growth; the rest are the plain operators.
_BINARY_OPERATIONS: Final[Mapping[type[ast.operator], _BinaryOperation]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: _true_divide,
    ast.FloorDiv: _floor_divide,
    ast.Mod: _modulo,
    ast.Pow: _power,
    ast.LShift: _left_shift,
    ast.RShift: operator.rshift,  # shrinks its operand; nothing to bound
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}

_UNARY_OPERATIONS: Final[Mapping[type[ast.unaryop], Callable[[Any], Any]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
    ast.Not: _logical_not,
}

# Ordering and equality; numpy evaluates them elementwise, str arrays included.
_COMPARISONS: Final[Mapping[type[ast.cmpop], _BinaryOperation]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}

# How rejected constructs are named in error messages.
_FORBIDDEN: Final[Mapping[type[ast.AST], str]] = {
    ast.Lambda: "lambda expressions are",
    ast.ListComp: "list comprehensions are",
    ast.SetComp: "set comprehensions are",
    ast.DictComp: "dict comprehensions are",
    ast.GeneratorExp: "generator expressions are",
    ast.NamedExpr: "assignment expressions (:=) are",
    ast.Starred: "starred expressions (*x) are",
    ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are",
    ast.Dict: "dict displays are",
    ast.Set: "set displays are",
    ast.Slice: "slices are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
    ast.MatMult: "the '@' operator is",
    ast.Is: "'is' comparisons are",
    ast.IsNot: "'is not' comparisons are",
}


@final
class Expression:
    """A compiled expression; call it with an environment to evaluate it.

    ``source`` is the text it was compiled from and ``names`` the free variable names it
    reads (function names and :data:`CONSTANTS` excluded), so callers can check an
    environment or order derived fields before evaluating anything.
    """

    __slots__ = ("_evaluate", "names", "source")

    source: str
    names: frozenset[str]

    def __init__(self, source: str, names: frozenset[str], evaluate: _Evaluator) -> None:
        self.source = source
        self.names = names
        self._evaluate = evaluate

    def __call__(self, env: Mapping[str, Any]) -> Any:
        """Evaluate for ``env``; an array in, an array out (one element per device)."""
        try:
            # Floating-point warnings are off: IEEE results stand, division by zero is
            # checked explicitly, and a warning per tick would only be noise.
            with np.errstate(all="ignore"):
                result = self._evaluate(env)
        except ZeroDivisionError as exc:
            raise ExpressionError(
                f"division by zero in {self.source!r}", expression=self.source
            ) from exc
        except _EVALUATION_ERRORS as exc:
            raise ExpressionError(
                f"cannot evaluate {self.source!r}: {exc}", expression=self.source
            ) from exc
        return result

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile_expression(source: str, *, allowed_names: Collection[str] | None = None) -> Expression:
    """Parse, check and compile ``source``.

    With ``allowed_names``, any other name (bar :data:`CONSTANTS`) is an error here, not
    at evaluation time. Raises :class:`~iotix.errors.ExpressionError` for anything
    outside the whitelist described in the module docstring.
    """
    if len(source) > _MAX_SOURCE_CHARS:
        raise ExpressionError(
            f"expression is too long ({len(source)} characters; at most {_MAX_SOURCE_CHARS})",
            expression=source,
        )
    if not source.strip():
        msg = "expression is empty"
        raise ExpressionError(msg, expression=source)
    tree = _parse(source)
    compiler = _Compiler(source, allowed_names)
    evaluate = compiler.compile(tree.body, depth=1)
    return Expression(source, frozenset(compiler.names), evaluate)


def _parse(source: str) -> ast.Expression:
    # Leading blanks (as YAML block scalars leave them) are an "unexpected indent" to the
    # parser; strip them and add them back to the reported column.
    stripped = source.lstrip(" \t")
    indent = len(source) - len(stripped)
    try:
        return ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        line = exc.lineno or 1
        text = stripped.splitlines()[line - 1] if stripped.splitlines() else ""
        # The parser reports no offset for an expression that ends too early.
        column = exc.offset if exc.offset else len(text) + 1
        if line == 1:
            column += indent
        where = f"column {column}" if line == 1 else f"line {line}, column {column}"
        raise ExpressionError(f"syntax error at {where}: {exc.msg}", expression=source) from exc
    except ValueError as exc:  # null bytes in the source
        raise ExpressionError(f"cannot parse expression: {exc}", expression=source) from exc


def _did_you_mean(name: str, candidates: Collection[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


class _Compiler:
    """Turns a checked AST into closures, collecting the free names on the way."""

    def __init__(self, source: str, allowed_names: Collection[str] | None) -> None:
        self.source = source
        self.allowed = None if allowed_names is None else frozenset(allowed_names)
        self.names: set[str] = set()

    def error(self, message: str) -> ExpressionError:
        return ExpressionError(message, expression=self.source)

    def compile(self, node: ast.expr, *, depth: int) -> _Evaluator:
        if depth > _MAX_NESTING_LEVELS:
            raise self.error(
                f"expression is nested too deeply (at most {_MAX_NESTING_LEVELS} levels)"
            )
        inner = depth + 1
        match node:
            case ast.Constant(value=value):
                return _constant(self.literal(node, value))
            case ast.Name(id=name):
                return self.name(name)
            case ast.BinOp(left=left, op=op, right=right):
                return self.binary(left, op, right, depth=inner)
            case ast.UnaryOp(op=op, operand=operand):
                return self.unary(op, operand, depth=inner)
            case ast.BoolOp(op=op, values=values):
                return self.boolean(op, values, depth=inner)
            case ast.Compare(left=left, ops=ops, comparators=comparators):
                return self.comparison(left, ops, comparators, depth=inner)
            case ast.IfExp(test=test, body=body, orelse=orelse):
                return self.conditional(test, body, orelse, depth=inner)
            case ast.Call():
                return self.call(node, depth=inner)
            case ast.Attribute(value=base, attr=key):
                if key.startswith("_"):
                    raise self.error(f"attribute access to {key!r} is not allowed")
                return self.field(base, key, _snippet(node))
            case ast.Subscript(value=base, slice=key_node):
                return self.field(base, self.subscript_key(key_node), _snippet(node))
            case ast.Tuple() | ast.List():
                kind = "tuples" if isinstance(node, ast.Tuple) else "lists"
                raise self.error(
                    f"{kind} are only allowed on the right of 'in' / 'not in', "
                    f"not in {_snippet(node)!r}"
                )
        raise self.error(f"{_describe(node)} not allowed")

    def literal(self, node: ast.AST, value: object) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise self.error(f"{type(value).__name__} literals like {_snippet(node)!r} are not allowed")

    def name(self, name: str) -> _Evaluator:
        if name in CONSTANTS:
            return _constant(CONSTANTS[name])
        if self.allowed is not None and name not in self.allowed:
            known = ", ".join(sorted(self.allowed)) or "(none)"
            hint = _did_you_mean(name, [*self.allowed, *CONSTANTS])
            raise self.error(f"unknown name {name!r}{hint}; known names: {known}")
        self.names.add(name)
        source = self.source

        def evaluate(env: Mapping[str, Any]) -> Any:
            try:
                return env[name]
            except KeyError as exc:
                raise ExpressionError(
                    f"name {name!r} is not defined when evaluating {source!r}",
                    expression=source,
                ) from exc

        return evaluate

    def binary(
        self, left: ast.expr, op: ast.operator, right: ast.expr, *, depth: int
    ) -> _Evaluator:
        operation = _BINARY_OPERATIONS.get(type(op))
        if operation is None:
            raise self.error(f"{_describe(op)} not allowed")
        # A literal right operand settles the integer-growth checks here: a float
        # exponent cannot grow an int, nor can a left shift by 0 to 64 bits.
        literal = right.value if isinstance(right, ast.Constant) else None
        if operation is _left_shift and type(literal) is int and 0 <= literal <= _MAX_SHIFT_BITS:
            operation = operator.lshift
        elif operation is _power and type(literal) is float:
            operation = operator.pow
        first = self.compile(left, depth=depth)
        second = self.compile(right, depth=depth)

        def evaluate(env: Mapping[str, Any]) -> Any:
            return operation(first(env), second(env))

        return evaluate

    def unary(self, op: ast.unaryop, operand: ast.expr, *, depth: int) -> _Evaluator:
        operation = _UNARY_OPERATIONS[type(op)]
        inner = self.compile(operand, depth=depth)

        def evaluate(env: Mapping[str, Any]) -> Any:
            return operation(inner(env))

        return evaluate

    def boolean(self, op: ast.boolop, values: list[ast.expr], *, depth: int) -> _Evaluator:
        combine = _all_true if isinstance(op, ast.And) else _any_true
        operands = [self.compile(value, depth=depth) for value in values]

        def evaluate(env: Mapping[str, Any]) -> Any:
            return combine([operand(env) for operand in operands])

        return evaluate

    def comparison(
        self,
        left: ast.expr,
        ops: list[ast.cmpop],
        comparators: list[ast.expr],
        *,
        depth: int,
    ) -> _Evaluator:
        if any(isinstance(op, ast.In | ast.NotIn) for op in ops):
            if len(ops) > 1:
                raise self.error("'in' and 'not in' cannot be chained with other comparisons")
            return self.membership(left, ops[0], comparators[0], depth=depth)
        operations: list[_BinaryOperation] = []
        for op in ops:
            operation = _COMPARISONS.get(type(op))
            if operation is None:
                raise self.error(f"{_describe(op)} not allowed; use == or !=")
            operations.append(operation)
        first = self.compile(left, depth=depth)
        rest = [self.compile(comparator, depth=depth) for comparator in comparators]
        if len(operations) == 1:
            (operation,) = operations
            (second,) = rest

            def evaluate(env: Mapping[str, Any]) -> Any:
                return operation(first(env), second(env))

            return evaluate

        links = list(zip(operations, rest, strict=True))

        def evaluate_chain(env: Mapping[str, Any]) -> Any:
            # `a < b < c` is `a < b and b < c` with `b` evaluated once.
            lhs = first(env)
            results = []
            for link_operation, link_operand in links:
                rhs = link_operand(env)
                results.append(link_operation(lhs, rhs))
                lhs = rhs
            return _all_true(results)

        return evaluate_chain

    def membership(
        self, left: ast.expr, op: ast.cmpop, choices_node: ast.expr, *, depth: int
    ) -> _Evaluator:
        choices = self.literal_choices(choices_node)
        # Converted once; np.isin would otherwise convert the tuple on every call.
        choices_array = np.asarray(choices)
        negate = isinstance(op, ast.NotIn)
        operand = self.compile(left, depth=depth)

        def evaluate(env: Mapping[str, Any]) -> Any:
            value = operand(env)
            if isinstance(value, np.ndarray):
                return np.isin(value, choices_array, invert=negate)
            return (value in choices) != negate

        return evaluate

    def literal_choices(self, node: ast.expr) -> tuple[Any, ...]:
        if not isinstance(node, ast.Tuple | ast.List):
            raise self.error(
                f"the right side of 'in' must be a tuple or list of literals, "
                f"not {_snippet(node)!r}"
            )
        values = tuple(self.choice(element) for element in node.elts)
        # numpy would turn (1, "a") into ("1", "a") and match neither 1 nor "1" sensibly.
        strings = sum(isinstance(value, str) for value in values)
        if 0 < strings < len(values):
            raise self.error(
                f"an 'in' list cannot mix strings and other values: {_snippet(node)!r}"
            )
        return values

    def choice(self, node: ast.expr) -> Any:
        match node:
            case ast.Constant(value=value):
                return self.literal(node, value)
            case ast.UnaryOp(op=ast.USub() | ast.UAdd() as sign, operand=ast.Constant(value=value)):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return -value if isinstance(sign, ast.USub) else value
        raise self.error(f"only literals may appear in an 'in' list, not {_snippet(node)!r}")

    def conditional(
        self, test: ast.expr, body: ast.expr, orelse: ast.expr, *, depth: int
    ) -> _Evaluator:
        condition = self.compile(test, depth=depth)
        if_true = self.compile(body, depth=depth)
        if_false = self.compile(orelse, depth=depth)

        def evaluate(env: Mapping[str, Any]) -> Any:
            chosen = condition(env)
            if isinstance(chosen, np.ndarray) and chosen.ndim == 1:
                # Each branch sees only its own rows, so `1 / x if x != 0 else 0` is safe
                # for a batch exactly as it is for one device.
                mask = chosen.astype(bool)
                count = len(mask)
                if mask.all():
                    return _spread(if_true(env), count)
                if not mask.any():
                    return _spread(if_false(env), count)
                yes = np.asarray(if_true(_MaskedEnv(env, mask)))
                no = np.asarray(if_false(_MaskedEnv(env, ~mask)))
                if {yes.dtype.kind, no.dtype.kind} <= set("biuf") or yes.dtype == no.dtype:
                    out = np.empty(count, dtype=np.result_type(yes, no))
                else:
                    out = np.empty(count, dtype=object)
                out[mask] = yes
                out[~mask] = no
                return out
            if isinstance(chosen, np.ndarray):
                return np.where(chosen, if_true(env), if_false(env))
            return if_true(env) if chosen else if_false(env)

        return evaluate

    def call(self, node: ast.Call, *, depth: int) -> _Evaluator:
        allowed = ", ".join(sorted(FUNCTIONS))
        if not isinstance(node.func, ast.Name):
            raise self.error(
                f"calling {_snippet(node.func)!r} is not allowed; allowed functions: {allowed}"
            )
        name = node.func.id
        entry = _FUNCTION_TABLE.get(name)
        if entry is None:
            hint = _did_you_mean(name, FUNCTIONS)
            raise self.error(f"calling {name!r} is not allowed{hint}; allowed functions: {allowed}")
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self.error(f"'**' arguments are not allowed in {name}()")
            raise self.error(
                f"keyword argument {keyword.arg!r} is not allowed in {name}(); "
                "pass arguments by position"
            )
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise self.error(f"starred arguments (*x) are not allowed in {name}()")
        function, fewest, most = entry
        count = len(node.args)
        if count < fewest or (most is not None and count > most):
            expected = (
                f"{fewest}"
                if fewest == most
                else f"{fewest} or more"
                if most is None
                else f"{fewest} to {most}"
            )
            noun = "argument" if expected == "1" else "arguments"
            raise self.error(f"{name}() takes {expected} {noun} ({count} given)")
        arguments = [self.compile(argument, depth=depth) for argument in node.args]
        # The common arities get closures without an argument list to build.
        if count == 1:
            (only,) = arguments

            def evaluate_one(env: Mapping[str, Any]) -> Any:
                return function(only(env))

            return evaluate_one
        if count == 2:
            first, second = arguments

            def evaluate_two(env: Mapping[str, Any]) -> Any:
                return function(first(env), second(env))

            return evaluate_two

        def evaluate(env: Mapping[str, Any]) -> Any:
            return function(*[argument(env) for argument in arguments])

        return evaluate

    def subscript_key(self, node: ast.expr) -> str:
        if isinstance(node, ast.Slice):
            raise self.error(f"slices are not allowed: {_snippet(node)!r}")
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            raise self.error(f"a subscript must be a string literal, not {_snippet(node)!r}")
        if node.value.startswith("_"):
            raise self.error(f"access to key {node.value!r} is not allowed (it starts with '_')")
        return node.value

    def field(self, base: ast.expr, key: str, text: str) -> _Evaluator:
        if not isinstance(base, ast.Name) or base.id in CONSTANTS:
            raise self.error(
                f"{text!r} is not allowed: only a bare name bound to a mapping can be "
                "read from, as in payload.value or payload['value']"
            )
        name = base.id
        container = self.name(name)
        source = self.source

        def evaluate(env: Mapping[str, Any]) -> Any:
            mapping = container(env)
            if not isinstance(mapping, Mapping):
                kind = type(mapping).__name__
                msg = f"{name!r} is of type {kind}, not a mapping; cannot read {key!r}"
                raise TypeError(msg)
            try:
                return mapping[key]
            except KeyError as exc:
                available = ", ".join(sorted(map(str, mapping))) or "(none)"
                raise ExpressionError(
                    f"key {key!r} is missing from {name!r} in {source!r}; "
                    f"available keys: {available}",
                    expression=source,
                ) from exc

        return evaluate


def _constant(value: Any) -> _Evaluator:
    return lambda _env: value


def _describe(node: ast.AST) -> str:
    """Name a rejected construct, with the verb agreeing: 'slices are', 'await is'."""
    for kind, description in _FORBIDDEN.items():
        if isinstance(node, kind):
            return description
    return f"{type(node).__name__} expressions are"


def _snippet(node: ast.AST) -> str:
    """The source of ``node`` for an error message, shortened if long."""
    text = ast.unparse(node)
    return text if len(text) <= _SNIPPET_CHARS else text[: _SNIPPET_CHARS - 3] + "..."


def _spread(value: Any, count: int) -> Any:
    """A branch's value over all rows (a scalar branch becomes an array)."""
    if isinstance(value, np.ndarray) and value.shape == (count,):
        return value
    return np.broadcast_to(np.asarray(value), (count,)).copy()


class _MaskedEnv(Mapping[str, Any]):
    """The rows of an environment selected by a mask, computed on access."""

    def __init__(self, env: Mapping[str, Any], mask: npt.NDArray[np.bool_]) -> None:
        self._env = env
        self._mask = mask

    def __getitem__(self, name: str) -> Any:
        value = self._env[name]
        count = len(self._mask)
        if isinstance(value, np.ndarray) and value.ndim == 1 and len(value) == count:
            return value[self._mask]
        if isinstance(value, Mapping) and all(
            isinstance(v, np.ndarray) and v.shape == (count,) for v in value.values()
        ):
            return {key: part[self._mask] for key, part in value.items()}
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)

"""Tests for the safe, vectorised expression evaluator."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from iotix.errors import ExpressionError
from iotix.model.expr import CONSTANTS, FUNCTIONS, Expression, compile_expression


def evaluate(source: str, **env: Any) -> Any:
    return compile_expression(source)(env)


def assert_array_equal(actual: Any, expected: Any) -> None:
    assert isinstance(actual, np.ndarray)
    np.testing.assert_array_equal(actual, np.asarray(expected))


# --- operators -------------------------------------------------------------------

# (source, result for a=7 and b=2, result for a=[7, -7, 6] and b=[2, 2, 3])
OPERATOR_CASES = [
    ("a + b", 9, [9, -5, 9]),
    ("a - b", 5, [5, -9, 3]),
    ("a * b", 14, [14, -14, 18]),
    ("a / b", 3.5, [3.5, -3.5, 2.0]),
    ("a // b", 3, [3, -4, 2]),
    ("a % b", 1, [1, 1, 0]),
    ("a ** b", 49, [49, 49, 216]),
    ("-a", -7, [-7, 7, -6]),
    ("+a", 7, [7, -7, 6]),
    ("a & b", 2, [2, 0, 2]),
    ("a | b", 7, [7, -5, 7]),
    ("a ^ b", 5, [5, -5, 5]),
    ("~a", -8, [-8, 6, -7]),
    ("a << b", 28, [28, -28, 48]),
    ("a >> b", 1, [1, -2, 0]),
]


@pytest.mark.parametrize(("source", "expected", "_"), OPERATOR_CASES)
def test_operator_on_scalars(source: str, expected: Any, _: Any) -> None:
    assert evaluate(source, a=7, b=2) == expected


@pytest.mark.parametrize(("source", "_", "expected"), OPERATOR_CASES)
def test_operator_on_arrays(source: str, _: Any, expected: Any) -> None:
    result = evaluate(source, a=np.array([7, -7, 6]), b=np.array([2, 2, 3]))
    assert_array_equal(result, expected)


def test_operator_mixes_array_and_scalar() -> None:
    assert_array_equal(evaluate("x * 2 + 1", x=np.array([1.0, 2.5])), [3.0, 6.0])


def test_operator_precedence_follows_python() -> None:
    assert evaluate("2 + 3 * 4 ** 2 - -1") == 51


COMPARISON_CASES = [
    ("a == b", False, [False, True, False]),
    ("a != b", True, [True, False, True]),
    ("a < b", False, [True, False, False]),
    ("a <= b", False, [True, True, False]),
    ("a > b", True, [False, False, True]),
    ("a >= b", True, [False, True, True]),
]


@pytest.mark.parametrize(("source", "expected", "_"), COMPARISON_CASES)
def test_comparison_on_scalars(source: str, expected: bool, _: Any) -> None:
    assert evaluate(source, a=3, b=2) == expected


@pytest.mark.parametrize(("source", "_", "expected"), COMPARISON_CASES)
def test_comparison_on_arrays(source: str, _: Any, expected: list[bool]) -> None:
    assert_array_equal(evaluate(source, a=np.array([1, 2, 3]), b=np.array([2, 2, 2])), expected)


def test_chained_comparison_on_scalars() -> None:
    check = compile_expression("0 < x <= 5")
    assert [check({"x": x}) for x in (0, 1, 5, 6)] == [False, True, True, False]


def test_chained_comparison_on_arrays_is_elementwise() -> None:
    result = evaluate("0 < x <= 5", x=np.array([0, 1, 5, 6]))
    assert_array_equal(result, [False, True, True, False])


def test_chained_comparison_of_three_links() -> None:
    result = evaluate("0 <= x < y != 4", x=np.array([1, 1, -1]), y=np.array([2, 4, 2]))
    assert_array_equal(result, [True, False, False])


def test_chained_comparison_evaluates_middle_operand_once() -> None:
    # Two sides of a chain share `max(x, 0)`; evaluating it twice would still give the
    # right answer, so check the result and that `names` sees one x.
    expression = compile_expression("0 <= max(x, 0) < 3")
    assert_array_equal(expression({"x": np.array([-1, 2, 3])}), [True, True, False])
    assert expression.names == {"x"}


# --- and, or, not, if-else -------------------------------------------------------


def test_and_on_arrays_is_elementwise() -> None:
    result = evaluate("x > 0 and y > 0", x=np.array([1, 1, -1]), y=np.array([1, -1, 1]))
    assert_array_equal(result, [True, False, False])


def test_or_on_arrays_is_elementwise() -> None:
    result = evaluate("x > 0 or y > 0", x=np.array([1, -1, -1]), y=np.array([-1, 1, -1]))
    assert_array_equal(result, [True, True, False])


def test_and_with_scalar_and_array_broadcasts() -> None:
    assert_array_equal(evaluate("flag and x > 0", flag=True, x=np.array([1, -1])), [True, False])


def test_and_of_several_operands() -> None:
    result = evaluate("a and b and c", a=np.array([1, 1]), b=np.array([1, 1]), c=np.array([1, 0]))
    assert_array_equal(result, [True, False])


def test_and_on_scalars_returns_python_bool() -> None:
    assert evaluate("1 and 2") is True
    assert evaluate("x and 0", x=5) is False


def test_or_on_scalars_returns_python_bool() -> None:
    assert evaluate("0 or 2") is True
    assert evaluate("x or 0", x=0) is False


def test_not_on_array_is_elementwise() -> None:
    assert_array_equal(evaluate("not x > 1", x=np.array([1, 2])), [True, False])


def test_not_on_scalar_returns_python_bool() -> None:
    assert evaluate("not x", x=0) is True


def test_if_else_on_array_condition_selects_elementwise() -> None:
    result = evaluate("x if x > 0 else -x", x=np.array([-2.0, 3.0]))
    assert_array_equal(result, [2.0, 3.0])


def test_if_else_on_array_condition_selects_strings() -> None:
    result = evaluate("'hot' if t > 28 else 'ok'", t=np.array([30, 20]))
    assert_array_equal(result, ["hot", "ok"])


def test_if_else_on_scalar_condition_evaluates_only_the_chosen_branch() -> None:
    assert evaluate("1 / x if x != 0 else 0", x=0) == 0


# --- strings and membership ------------------------------------------------------


def test_string_state_equality_on_array() -> None:
    states = np.array(["idle", "charging"])
    assert_array_equal(evaluate("state == 'charging'", state=states), [False, True])


def test_string_state_inequality_on_array() -> None:
    states = np.array(["idle", "charging"])
    assert_array_equal(evaluate("state != 'charging'", state=states), [True, False])


def test_string_state_equality_on_scalar() -> None:
    assert evaluate("state == 'idle'", state="idle") is True


def test_in_tuple_on_array() -> None:
    states = np.array(["idle", "charging", "off"])
    assert_array_equal(evaluate("state in ('idle', 'off')", state=states), [True, False, True])


def test_not_in_tuple_on_array() -> None:
    states = np.array(["idle", "charging", "off"])
    result = evaluate("state not in ('idle', 'off')", state=states)
    assert_array_equal(result, [False, True, False])


def test_in_list_on_scalar_returns_python_bool() -> None:
    assert evaluate("code in [1, 2, 3]", code=2) is True
    assert evaluate("code not in [1, 2, 3]", code=2) is False


def test_in_tuple_accepts_negative_numbers() -> None:
    assert_array_equal(evaluate("x in (-1, 1)", x=np.array([-1, 0, 1])), [True, False, True])


def test_in_empty_tuple_is_false() -> None:
    assert_array_equal(evaluate("x in ()", x=np.array([1, 2])), [False, False])


# --- functions -------------------------------------------------------------------

# (source, x, expected); each is also checked on the array [x, x].
FUNCTION_CASES = [
    ("abs(x)", -2.5, 2.5),
    ("min(x, 1)", 3.0, 1.0),
    ("min(x, 1, -4)", 3.0, -4.0),
    ("max(x, 1)", 3.0, 3.0),
    ("max(x, 1, 9)", 3.0, 9.0),
    ("round(x)", 2.5, 2.0),
    ("round(x, 1)", 1.26, 1.3),
    ("floor(x)", -1.5, -2.0),
    ("ceil(x)", -1.5, -1.0),
    ("sqrt(x)", 9.0, 3.0),
    ("exp(x)", 0.0, 1.0),
    ("log(x)", math.e, 1.0),
    ("log10(x)", 1000.0, 3.0),
    ("sin(x)", math.pi / 2, 1.0),
    ("cos(x)", 0.0, 1.0),
    ("tan(x)", math.pi / 4, 1.0),
    ("atan2(x, 1)", 1.0, math.pi / 4),
    ("hypot(x, 4)", 3.0, 5.0),
    ("degrees(x)", math.pi, 180.0),
    ("radians(x)", 180.0, math.pi),
    ("clip(x, 0, 10)", 12.0, 10.0),
    ("clip(x, 0, 10)", -3.0, 0.0),
    ("int(x)", 2.7, 2),
    ("int(x)", -2.7, -2),
    ("float(x)", 3, 3.0),
    ("bool(x)", 0.0, False),
]


@pytest.mark.parametrize(("source", "x", "expected"), FUNCTION_CASES)
def test_function_on_scalar(source: str, x: float, expected: float) -> None:
    assert evaluate(source, x=x) == pytest.approx(expected)


@pytest.mark.parametrize(("source", "x", "expected"), FUNCTION_CASES)
def test_function_on_array(source: str, x: float, expected: float) -> None:
    result = evaluate(source, x=np.array([x, x]))
    assert isinstance(result, np.ndarray)
    np.testing.assert_allclose(result, [expected, expected])


def test_functions_whitelist_is_exactly_the_documented_set() -> None:
    assert set(FUNCTIONS) == {
        "abs", "min", "max", "round", "floor", "ceil", "sqrt", "exp", "log", "log10", "sin",
        "cos", "tan", "atan2", "hypot", "degrees", "radians", "clip", "int", "float", "bool",
    }  # fmt: skip


def test_int_on_array_gives_int64() -> None:
    result = evaluate("int(x)", x=np.array([2.7, -2.7]))
    assert result.dtype == np.int64
    assert_array_equal(result, [2, -2])


def test_int_on_scalar_gives_python_int() -> None:
    assert type(evaluate("int(x)", x=2.7)) is int


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e19])
def test_int_of_unrepresentable_array_value_is_an_error(value: float) -> None:
    with pytest.raises(ExpressionError, match="int64"):
        evaluate("int(x)", x=np.array([1.0, value]))


def test_min_and_max_are_elementwise_on_arrays() -> None:
    result = evaluate("max(min(x, y), 0)", x=np.array([5, -3, 2]), y=np.array([4, 9, 8]))
    assert_array_equal(result, [4, 0, 2])


def test_sqrt_of_negative_array_value_is_nan_without_warning() -> None:
    result = evaluate("sqrt(x)", x=np.array([4.0, -1.0]))
    assert result[0] == 2.0
    assert math.isnan(result[1])


# --- constants -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pi", "e", "inf"])
def test_constant_evaluates_to_its_value(name: str) -> None:
    assert evaluate(name) == CONSTANTS[name]


def test_constants_take_precedence_over_the_environment() -> None:
    assert evaluate("pi", pi=3) == math.pi


@pytest.mark.parametrize(
    ("source", "expected"),
    [("1", 1), ("2.5", 2.5), ("'a'", "a"), ("True", True), ("None", None)],
)
def test_literal_evaluates_to_its_value(source: str, expected: object) -> None:
    result = evaluate(source)
    assert result == expected
    assert type(result) is type(expected)


# --- payload mappings ------------------------------------------------------------


def test_payload_attribute_access_reads_the_key() -> None:
    assert evaluate("payload.value + 1", payload={"value": 41}) == 42


def test_payload_subscript_reads_the_key() -> None:
    assert evaluate("payload['value'] + 1", payload={"value": 41}) == 42


def test_payload_value_combines_with_arrays() -> None:
    result = evaluate("level + payload.step", level=np.array([1, 2]), payload={"step": 10})
    assert_array_equal(result, [11, 12])


def test_payload_missing_key_names_key_and_available_keys() -> None:
    with pytest.raises(ExpressionError, match=r"'valu'.*available keys: mode, value"):
        evaluate("payload.valu", payload={"value": 1, "mode": "x"})


def test_payload_that_is_not_a_mapping_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="not a mapping"):
        evaluate("payload.value", payload=3)


# --- names -----------------------------------------------------------------------


def test_names_are_exactly_the_free_variables() -> None:
    expression = compile_expression(
        "sqrt(x ** 2 + y ** 2) * pi if payload.on and state in ('a',) else e + z['k']"
    )
    assert expression.names == frozenset({"x", "y", "payload", "state", "z"})


def test_names_of_a_constant_expression_are_empty() -> None:
    assert compile_expression("2 * pi + max(1, 2)").names == frozenset()


def test_expression_keeps_its_source() -> None:
    expression = compile_expression("x + 1")
    assert isinstance(expression, Expression)
    assert expression.source == "x + 1"
    assert repr(expression) == "Expression('x + 1')"


def test_allowed_names_accept_known_names() -> None:
    expression = compile_expression("temperature > 28", allowed_names={"temperature"})
    assert expression({"temperature": 30}) is True


def test_unknown_name_suggests_a_close_match() -> None:
    with pytest.raises(
        ExpressionError, match=r"unknown name 'tempreature' \(did you mean 'temperature'\?\)"
    ):
        compile_expression("tempreature > 28", allowed_names=["temperature", "humidity"])


def test_unknown_name_lists_known_names_sorted() -> None:
    with pytest.raises(
        ExpressionError, match=r"unknown name 'zzz'; known names: humidity, temperature$"
    ):
        compile_expression("zzz", allowed_names=["temperature", "humidity"])


def test_unknown_name_accepts_constants() -> None:
    assert compile_expression("pi", allowed_names=[]).names == frozenset()


def test_name_missing_from_environment_at_evaluation_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="name 'y' is not defined"):
        evaluate("x + y", x=1)


# --- rejections at compile time --------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x.__class__", "attribute access to '__class__' is not allowed"),
        ("x._private", "attribute access to '_private' is not allowed"),
        ("payload['__class__']", "key '__class__' is not allowed"),
        ("open('f')", "calling 'open' is not allowed; allowed functions: abs, atan2"),
        ("sqr(x)", r"calling 'sqr' is not allowed \(did you mean 'sqrt'\?\)"),
        ("x.y()", "calling 'x.y' is not allowed"),
        ("f()()", r"calling 'f\(\)' is not allowed"),
        ("round(x, ndigits=2)", "keyword argument 'ndigits' is not allowed"),
        ("round(**x)", r"'\*\*' arguments are not allowed"),
        ("abs(*x)", "starred arguments"),
        ("lambda: 1", "lambda expressions are not allowed"),
        ("[a for a in b]", "list comprehensions are not allowed"),
        ("{a for a in b}", "set comprehensions are not allowed"),
        ("{a: a for a in b}", "dict comprehensions are not allowed"),
        ("sum(a for a in b)", "calling 'sum'"),
        ("(a for a in b)", "generator expressions are not allowed"),
        ("(y := 1)", r"assignment expressions \(:=\) are not allowed"),
        ("f'{x}'", "f-strings are not allowed"),
        ("{'a': 1}", "dict displays are not allowed"),
        ("{1, 2}", "set displays are not allowed"),
        ("x[1:2]", "slices are not allowed"),
        ("x[0]", "subscript must be a string literal"),
        ("(x + 1).y", "only a bare name bound to a mapping"),
        ("a.b.c", "only a bare name bound to a mapping"),
        ("x is None", "'is' comparisons are not allowed"),
        ("x is not None", "'is not' comparisons are not allowed"),
        ("x @ y", "'@' operator is not allowed"),
        ("(1, 2)", "tuples are only allowed on the right of 'in'"),
        ("[1, 2]", "lists are only allowed on the right of 'in'"),
        ("x in y", "right side of 'in' must be a tuple or list of literals"),
        ("x in (y, 1)", "only literals may appear in an 'in' list"),
        ("x in (1, 'a')", "cannot mix strings and other values"),
        ("0 < x in (1, 2)", "cannot be chained"),
        ("1j", "complex literals"),
        ("b'raw'", "bytes literals"),
        ("max(x)", r"max\(\) takes 2 or more arguments \(1 given\)"),
        ("clip(x, 1)", r"clip\(\) takes 3 arguments \(2 given\)"),
        ("round(x, 1, 2)", r"round\(\) takes 1 to 2 arguments \(3 given\)"),
        ("abs(x, y)", r"abs\(\) takes 1 argument \(2 given\)"),
        ("(yield)", "yield is not allowed"),
        ("", "expression is empty"),
        ("   ", "expression is empty"),
        ("x" * 1001, r"too long \(1001 characters; at most 1000\)"),
        ("-" * 150 + "x", "nested too deeply"),
    ],
)
def test_unsafe_or_unsupported_source_is_rejected(source: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message) as caught:
        compile_expression(source)
    assert caught.value.expression == source


def test_long_construct_is_shortened_in_the_message() -> None:
    with pytest.raises(ExpressionError, match=r"not '(x \+ )+x\.\.\.'$") as caught:
        compile_expression("x in " + " + ".join(["x"] * 100))
    assert len(str(caught.value)) < 150


@given(source=st.text(max_size=40))
def test_arbitrary_text_compiles_or_raises_expression_error(source: str) -> None:
    # Anything but an ExpressionError escaping fails the test.
    with contextlib.suppress(ExpressionError):
        compile_expression(source)


def test_syntax_error_reports_the_column() -> None:
    with pytest.raises(ExpressionError, match="syntax error at column 3"):
        compile_expression("a b")


def test_syntax_error_column_counts_leading_blanks() -> None:
    with pytest.raises(ExpressionError, match="syntax error at column 5"):
        compile_expression("  a b")


def test_leading_blanks_are_allowed() -> None:
    assert evaluate("  1 + 1") == 2


def test_source_of_exactly_the_length_limit_is_accepted() -> None:
    assert evaluate("1" + " " * 999) == 1


# --- evaluation errors -----------------------------------------------------------


def test_scalar_division_by_zero_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="division by zero in 'x / y'") as caught:
        evaluate("x / y", x=1, y=0)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("source", ["x / y", "x // y", "x % y"])
def test_float_array_division_by_zero_is_an_expression_error(source: str) -> None:
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate(source, x=np.array([1.0, 2.0]), y=np.array([1.0, 0.0]))


@pytest.mark.parametrize("source", ["x // y", "x % y"])
def test_integer_array_division_by_zero_is_an_expression_error(source: str) -> None:
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate(source, x=np.array([1, 2]), y=np.array([1, 0]))


def test_numpy_scalar_division_by_zero_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate("sqrt(x) / 0", x=4.0)


def test_array_division_of_non_finite_value_by_zero_passes_through() -> None:
    result = evaluate("x / y", x=np.array([math.inf, math.nan]), y=np.array([0.0, 0.0]))
    assert result[0] == math.inf
    assert math.isnan(result[1])


def test_array_division_without_zero_divisor_is_unchecked_ieee() -> None:
    assert_array_equal(evaluate("x / 2", x=np.array([1.0, math.inf])), [0.5, math.inf])


def test_type_error_is_an_expression_error_naming_the_source() -> None:
    with pytest.raises(ExpressionError, match="""cannot evaluate "'str' \\+ 1": """) as caught:
        evaluate("'str' + 1")
    assert isinstance(caught.value.__cause__, TypeError)


def test_numpy_error_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="cannot evaluate"):
        evaluate("x & 1", x=np.array([1.5]))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("2 ** 65", "exponent 65 is too large"),
        ("x ** 64", "would exceed 4096 bits"),
        ("1 << 65", "left by 65 bits is not allowed"),
        ("1 << x", "left by 100 bits is not allowed"),
        ("'ab' * x", "repeating a string or list"),
        ("payload.items * 3", "repeating a string or list"),
        ("'%999999d' % 1", "formatting a string with '%'"),
    ],
)
def test_unbounded_growth_is_refused(source: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        evaluate(source, x=10**100 if "**" in source else 100, payload={"items": [1]})


def test_bounded_integer_power_and_shift_are_exact() -> None:
    assert evaluate("2 ** 64 + (1 << 64)") == 2**65


def test_float_power_is_not_bounded_by_the_integer_rule() -> None:
    assert evaluate("x ** 100.0", x=1) == 1.0


def test_integer_array_power_is_not_bounded_by_the_integer_rule() -> None:
    assert_array_equal(evaluate("x ** 2", x=np.array([3, 4])), [9, 16])


@pytest.mark.parametrize(
    "source",
    ["1 / x", "x.y", "z", "int('a')", "x.__class__", "a b", ""],
)
def test_every_expression_error_carries_the_source(source: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate(source, x=0)
    assert caught.value.expression == source


# --- vectorised evaluation agrees with scalar evaluation --------------------------

_LEAVES = st.one_of(
    st.sampled_from(["x", "y"]),
    st.integers(-9, 9).map(str),
    st.floats(-100, 100, allow_nan=False, allow_infinity=False).map(repr),
)
_EXPRESSIONS = st.recursive(
    _LEAVES,
    lambda children: st.builds(
        lambda left, op, right: f"({left} {op} {right})",
        children,
        st.sampled_from(["+", "-", "*"]),
        children,
    ),
    max_leaves=10,
)


@st.composite
def _environments(draw: st.DrawFn) -> dict[str, np.ndarray[Any, Any]]:
    size = draw(st.integers(1, 20))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    return {name: draw(hnp.arrays(np.float64, size, elements=elements)) for name in ("x", "y")}


@given(source=_EXPRESSIONS, env=_environments())
def test_vectorised_result_equals_elementwise_scalar_results(
    source: str, env: dict[str, np.ndarray[Any, Any]]
) -> None:
    expression = compile_expression(source)
    vectorised = expression(env)
    elementwise = [
        expression({"x": float(x), "y": float(y)}) for x, y in zip(env["x"], env["y"], strict=True)
    ]
    np.testing.assert_allclose(np.broadcast_to(vectorised, env["x"].shape), elementwise, rtol=1e-12)


def test_conditional_evaluates_each_branch_only_on_its_own_rows() -> None:
    x = np.array([0.0, 2.0, 0.0, 4.0])
    result = compile_expression("1 / x if x != 0 else -1")({"x": x})
    np.testing.assert_array_equal(result, [-1.0, 0.5, -1.0, 0.25])


def test_conditional_mixing_strings_and_numbers_gives_objects() -> None:
    x = np.array([1.0, -1.0])
    result = compile_expression("'up' if x > 0 else x")({"x": x})
    assert result.tolist() == ["up", -1.0]

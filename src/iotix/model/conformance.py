"""Conformance: could a device model have produced this (topic, payload)?

A functional check of what reaches the broker: :class:`Conformance` is built once from
one or more loaded models and then called per received message. It answers ``None``
when the message is one the model could have sent, and otherwise a short problem text
that names the message, the place in the payload and the problem::

    telemetry.temperature: 41.2 above max 40
    reading: 30 bytes, but the layout is 31 bytes
    no message of any model has topic 'x/y'

How a message is checked:

1. **Topic.** Every message and event topic template becomes a regex: literal text as
   it is, each placeholder a fragment derived from what the name can hold (the message
   name, the model name, an attribute's choices, the device-id template, digits for
   ``index``...), anything else ``.*?``. The device id the topic carries is captured
   and must equal a ``device_id`` carried by the payload. Command, reply, will and
   birth topics are recognised and skipped (``None``), never flagged. Several
   templates may match one topic (all events share ``devices/{device_id}/events`` by
   default): the message conforms if any of them accepts it; otherwise the problem of
   the candidate that got furthest is reported (see the ranks below).
2. **Payload.** Decoded with the model's own codec (:func:`iotix.payload.build_encoder`):
   JSON, CBOR and MessagePack documents are walked against the template (or the flat
   default object): exact keys, list lengths, literal constants, ``${name}`` values by
   the rule of ``name``, interpolated strings by a regex with one group per
   placeholder. Text payloads match a regex built from the ``str.format`` template, CSV
   lines have exactly the columns, binary frames are decoded by their layout (which
   verifies lengths, length fields and CRCs) and their constants compared, raw
   payloads are compared byte for byte.
3. **Values.** Each name has a :class:`ValueRule` derived from its generator: the JSON
   types it can take, bounds where the model makes them certain (``min``/``max``, a
   uniform's range, a wave without noise, a counter's start and ``wrap_at``, a GPS
   route's bounding box, a replay column's range), the finite set of values of a
   ``choice``, a constant, a string expression, a replay text column, and patterns for
   UUIDs, ISO 8601 times, templates and device ids. A field overridden per state takes
   the union of its generators over the states the message can be sent in.

What it cannot check (it errs towards accepting):

- anything that depends on the device's history or on other fields: a counter's next
  value, a walk's step, a ``seq`` without gaps (the probe's tracker counts those), an
  expression's value given its inputs (``heating`` against ``temperature``), a field
  overridden per state against the ``state`` the same payload reports;
- the range of expressions (only their type, and the values of literal branches), of
  numbers nothing bounds (a gaussian or walk without ``min``/``max``, a wave with
  noise), of ``gps_area`` positions with jitter; the distributions themselves (a
  boolean's probability, a choice's weights);
- a constant a command sets (whatever the command's expression can give: anything, for
  ``payload.value``) and a counter a command sets (its type only);
- values written with a format spec other than plain number formatting (``{x:>8}``,
  ``!r``), interpolated mapping keys, ``bytes`` fields read from the record, and two
  adjacent free-form placeholders (the split between them is unknowable);
- a message on a topic that a command, reply, will or birth also uses (skipped).

Ranks: a problem found while decoding (rank 3) is worse than a payload of the wrong
shape (missing or unexpected keys, wrong constants, rank 2), which is worse than a
wrong value in the right place (rank 1).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import math
import re
import string
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

import numpy as np
import orjson

from iotix.errors import PayloadError, ReplayError
from iotix.model.expr import CONSTANTS
from iotix.model.generators import EARTH_RADIUS_M, ReplayTable
from iotix.model.runtime import DEFAULT_EVENT_TOPIC, DEFAULT_TOPIC
from iotix.model.spec import (
    BooleanFieldSpec,
    ChoiceSpec,
    ConstantFieldSpec,
    CounterFieldSpec,
    ExpressionAttributeSpec,
    ExpressionFieldSpec,
    GaussianFieldSpec,
    GaussianSpec,
    GPSAreaFieldSpec,
    GPSRouteFieldSpec,
    RandomWalkFieldSpec,
    ReplayFieldSpec,
    TemplateAttributeSpec,
    TemplateFieldSpec,
    TimestampFieldSpec,
    UniformFieldSpec,
    UniformSpec,
    UUIDFieldSpec,
    WaveFieldSpec,
    WeightedChoiceFieldSpec,
)
from iotix.payload.binary import BinaryPayloadEncoder
from iotix.payload.codec import build_encoder, render_value
from iotix.payload.spec import (
    FLOAT_TYPES,
    BinaryBitsFieldSpec,
    BinaryBytesFieldSpec,
    BinaryNumberFieldSpec,
    BinaryPayloadSpec,
    BinaryStringFieldSpec,
    CBORPayloadSpec,
    CSVPayloadSpec,
    JSONPayloadSpec,
    MsgPackPayloadSpec,
    Placeholder,
    RawPayloadSpec,
    TextPayloadSpec,
    parse_placeholders,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path

    from iotix.model.loader import LoadedModel
    from iotix.model.spec import DeviceModelSpec, EventSpec, FieldSpec, MessageSpec
    from iotix.payload.spec import PayloadSpec

__all__ = ["Conformance", "ValueRule"]

# Ranks of a problem: how far the message got before it failed (see the module doc).
_VALUE: Final = 1
_SHAPE: Final = 2
_UNDECODABLE: Final = 3

_INT: Final = frozenset({"int"})
_FLOAT: Final = frozenset({"float"})
_NUMBER: Final = frozenset({"int", "float"})
_BOOL: Final = frozenset({"bool"})
_STR: Final = frozenset({"str"})
_NULL: Final = frozenset({"null"})
_MAP: Final = frozenset({"map"})

# Type tags of decoded values; anything else (a CBOR tag, a set...) is "other".
_TAGS: Final[Mapping[type, str]] = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    type(None): "null",
    dict: "map",
    list: "list",
    tuple: "list",
    bytes: "bytes",
}
_KIND_WORDS: Final = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
    "null": "null",
    "map": "an object",
    "list": "a list",
    "bytes": "bytes",
}

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UUID4: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_ISO8601_MS: Final = r"-?[0-9]{4,}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"
_ANYTHING: Final = ".*?"
# A format spec that only pads, signs, groups or sets the precision of a number (no fill
# character, which could be anything): its output stays within _FORMATTED_NUMBER.
_NUMBER_SPEC: Final = re.compile(
    r"(?:[<>=^])?[-+ ]?z?#?0?(?P<width>[0-9]+)?(?P<grouping>[_,])?(?:\.(?P<precision>[0-9]+))?"
    r"(?P<type>[deEfFgGn%])?"
)
_FORMATTED_NUMBER: Final = r"[-+ 0-9.eEinfaINFA%]+"
_FORMATTED_INTEGER: Final = r"[-+ 0-9]+"
_INTEGER: Final = r"-?[0-9]+"
_INTEGER_TEXT: Final = re.compile(_INTEGER)
# Fragments that match runs of characters of no fixed form: two of them side by side
# split their text unknowably.
_FREE_FRAGMENTS: Final = frozenset(
    {
        _ANYTHING,
        _INTEGER,
        *(
            fragment.replace("]", f"{grouping}]")
            for fragment in (_FORMATTED_NUMBER, _FORMATTED_INTEGER)
            for grouping in ("", ",", "_")
        ),
    }
)
# Choices beyond this many are checked by membership, not spelt out in a regex.
_MAX_REGEX_CHOICES: Final = 64
_MAX_SHOWN_CHOICES: Final = 6
_MAX_SHOWN_CHARS: Final = 60
# Relative precision of the binary float types (half the gap between neighbours).
_FLOAT_EPSILON: Final = {"f16": 2.0**-11, "f32": 2.0**-24, "f64": 2.0**-53}
_EVENT_DEFAULT_NAMES: Final = ("device_id", "event", "severity", "active", "state", "ts_ms", "seq")
_MESSAGE_DEFAULT_NAMES: Final = ("device_id", "ts_ms", "seq")
_FLOAT_FUNCTIONS: Final = frozenset(
    {"sqrt", "exp", "log", "log10", "sin", "cos", "tan", "atan2", "hypot", "degrees", "radians"}
)
_FLOAT_FUNCTIONS_OF_ANY: Final = frozenset({"floor", "ceil"})  # numpy gives floats
_NUMERIC_FUNCTIONS: Final = frozenset({"abs", "min", "max", "clip", "round"})


class _Problem(NamedTuple):
    """Why a message does not conform: ``where`` is the path below the message."""

    rank: int
    where: str
    text: str


_ValueCheck: TypeAlias = "Callable[[Any], _Problem | None]"
"""The check of one decoded value; None means it conforms."""
_Check: TypeAlias = "Callable[[Any, str | None], _Problem | None]"
"""The check of one value given the device id the topic carries (None if it has none)."""
_PayloadCheck: TypeAlias = "Callable[[bytes, str | None], _Problem | None]"
"""The check of the payload bytes of one message type."""
_NumberCheck: TypeAlias = "Callable[[float], _Problem | None]"


@dataclass(frozen=True)
class ValueRule:
    """What one value of a message may be.

    ``kinds`` are the type tags it may decode to (``int``, ``float``, ``bool``, ``str``,
    ``null``, ``map``, ``list``); empty means any value. ``float`` admits integers too,
    as a producer may well write ``21`` for ``21.0``; ``int`` admits no fraction.
    Bounds apply to numbers: ``minimum`` and ``maximum`` inclusive (widened by
    ``slack``, the rounding a ``round`` setting allows), ``below`` exclusive.
    ``choices`` is the complete set of values; ``pattern`` a regex a string must match
    in full (``pattern_name`` says what it is, for the problem text); ``parts`` the keys
    and rules of a mapping (a GPS position); ``alternatives``, when set, makes the rule
    the union of those rules and every other attribute is ignored. ``rank`` is the
    rank of a problem with this value (a message or event name is part of the shape).
    """

    kinds: frozenset[str] = frozenset()
    minimum: float | None = None
    maximum: float | None = None
    below: float | None = None
    slack: float = 0.0
    finite: bool = False
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    pattern_name: str = ""
    parts: tuple[tuple[str, ValueRule], ...] | None = None
    alternatives: tuple[ValueRule, ...] = ()
    rank: int = _VALUE

    @property
    def is_any(self) -> bool:
        """Whether every value conforms."""
        return not self.kinds and not self.alternatives

    @property
    def is_numeric(self) -> bool:
        """A plain number rule: numbers (or null, for NaN in JSON) and nothing else."""
        return (
            not self.alternatives
            and bool(self.kinds & _NUMBER)
            and self.kinds <= _NUMBER | _NULL
            and self.pattern is None
            and self.parts is None
        )

    @property
    def has_bounds(self) -> bool:
        return self.minimum is not None or self.maximum is not None or self.below is not None


ANY: Final = ValueRule()


# ---------------------------------------------------------------------------------------
# Building rules
# ---------------------------------------------------------------------------------------


def _rounding_slack(decimals: int | None) -> float:
    """How far ``round: decimals`` can move a value past a bound."""
    return 0.0 if decimals is None else 0.5 * 10.0**-decimals


def _number_rule(
    decimals: int | None,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    below: float | None = None,
    integral: bool = False,
) -> ValueRule:
    """A finite number, an integer with ``round: 0`` (or ``integral``)."""
    return ValueRule(
        _INT if integral or decimals == 0 else _FLOAT,
        minimum=minimum,
        maximum=maximum,
        below=below,
        slack=_rounding_slack(decimals),
        finite=True,
    )


def _tag(value: Any) -> str:
    return _TAGS.get(type(value), "other")


def _distinct(values: Iterable[Any]) -> list[Any]:
    """The values without repeats, in order; ``1`` and ``True`` stay apart."""
    seen: set[tuple[str, Any]] = set()
    unhashable: list[Any] = []
    found: list[Any] = []
    for value in values:
        try:
            key = (_tag(value), value)
            if key in seen:
                continue
            seen.add(key)
        except TypeError:
            if any(_tag(value) == _tag(other) and value == other for other in unhashable):
                continue
            unhashable.append(value)
        found.append(value)
    return found


def _choice_rule(values: Sequence[Any], *, rank: int = _VALUE) -> ValueRule:
    """One of ``values``, as the runtime holds them: through ``numpy.asarray``, which
    turns ``[7.4, 11]`` into floats and ``[1, "a"]`` into strings."""
    try:
        table = np.asarray(values)
    except ValueError:  # ragged nested lists
        return ANY
    if table.ndim != 1:
        return ANY
    unique = _distinct(table.tolist())
    kinds = frozenset(_tag(value) for value in unique)
    if "other" in kinds:
        return ANY
    return ValueRule(kinds, choices=tuple(unique), rank=rank)


def _constant_rule(value: Any, *, rank: int = _VALUE) -> ValueRule:
    """Exactly ``value`` (a plain str, bool, int, float or None)."""
    kind = _tag(value)
    if kind not in ("str", "bool", "int", "float", "null"):
        return ANY
    return ValueRule(frozenset({kind}), choices=(value,), rank=rank)


def _distribution_rule(value: Any) -> ValueRule:
    """The values a per-device distribution (or a plain value) draws."""
    if isinstance(value, UniformSpec):
        return _number_rule(value.round, value.low, value.high)
    if isinstance(value, GaussianSpec):
        return _number_rule(value.round, value.min, value.max)
    if isinstance(value, ChoiceSpec):
        return _choice_rule(value.values)
    return _constant_rule(value)


def _param_range(value: Any) -> tuple[float, float] | None:
    """The range of a numeric parameter (a plain number or a distribution), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value), float(value)
    slack = _rounding_slack(getattr(value, "round", None))
    if isinstance(value, UniformSpec):
        return min(value.low, value.high) - slack, max(value.low, value.high) + slack
    if isinstance(value, GaussianSpec):
        if value.min is None or value.max is None:
            return None
        return value.min - slack, value.max + slack
    if isinstance(value, ChoiceSpec):
        numbers = [v for v in np.asarray(value.values).tolist() if _tag(v) in ("int", "float")]
        if len(numbers) != len(value.values):
            return None
        return float(min(numbers)), float(max(numbers))
    return None


def _all_kinds(rule: ValueRule) -> frozenset[str]:
    """The kinds a rule admits, over its alternatives too."""
    kinds = rule.kinds
    for alternative in rule.alternatives:
        kinds |= alternative.kinds
    return kinds


def _strip_bounds(rule: ValueRule) -> ValueRule:
    """The kinds (and choices) of a rule, for names read by expressions."""
    if rule.alternatives:
        if any(alternative.is_any for alternative in rule.alternatives):
            return ANY
        return ValueRule(_all_kinds(rule))
    return ValueRule(rule.kinds, choices=rule.choices)


def _numeric_span(rule: ValueRule) -> tuple[float | None, float | None]:
    """The lowest and highest number a numeric rule admits (None: unbounded)."""
    if rule.choices is not None:
        numbers = [float(value) for value in rule.choices if _tag(value) in ("int", "float")]
        if not numbers:
            return None, None
        return min(numbers), max(numbers)
    high = rule.maximum
    if rule.below is not None:
        high = rule.below if high is None else max(high, rule.below)
    return rule.minimum, high


def _merge(first: ValueRule, second: ValueRule) -> ValueRule | None:
    """One rule admitting exactly what either admits (numbers: a little more), where a
    simple one exists; None where only a union of the two will do."""
    if first == second:
        return first
    plain = all(
        rule.pattern is None and rule.parts is None and not rule.alternatives
        for rule in (first, second)
    )
    if not plain:
        return None
    rank = min(first.rank, second.rank)
    if (
        first.choices is not None
        and second.choices is not None
        and not first.has_bounds
        and not second.has_bounds
    ):
        choices = _distinct([*first.choices, *second.choices])
        return ValueRule(first.kinds | second.kinds, choices=tuple(choices), rank=rank)
    if first.is_numeric and second.is_numeric:
        (low_a, high_a), (low_b, high_b) = _numeric_span(first), _numeric_span(second)
        return ValueRule(
            first.kinds | second.kinds,
            minimum=None if low_a is None or low_b is None else min(low_a, low_b),
            maximum=None if high_a is None or high_b is None else max(high_a, high_b),
            slack=max(first.slack, second.slack),
            finite=first.finite and second.finite,
            rank=rank,
        )
    return None


def _union(rules: Sequence[ValueRule]) -> ValueRule:
    """A rule admitting what any of ``rules`` admits."""
    merged: list[ValueRule] = []
    for rule in rules:
        if rule.is_any:
            return ANY
        for alternative in rule.alternatives or (rule,):
            for position, existing in enumerate(merged):
                combined = _merge(existing, alternative)
                if combined is not None:
                    merged[position] = combined
                    break
            else:
                merged.append(alternative)
    if not merged:
        return ANY
    if len(merged) == 1:
        return merged[0]
    return ValueRule(alternatives=tuple(merged))


# --- expressions --------------------------------------------------------------------


def _arithmetic(operator: ast.operator, left: ValueRule, right: ValueRule) -> ValueRule:
    if left.is_any or right.is_any or left.alternatives or right.alternatives:
        return ANY
    if isinstance(operator, ast.Add) and left.kinds == _STR and right.kinds == _STR:
        return ValueRule(_STR)
    numeric = _NUMBER | _BOOL | _NULL
    if not (left.kinds <= numeric and right.kinds <= numeric):
        return ANY
    if isinstance(operator, ast.BitAnd | ast.BitOr | ast.BitXor):
        return ValueRule(_BOOL) if left.kinds == right.kinds == _BOOL else ValueRule(_INT)
    if isinstance(operator, ast.LShift | ast.RShift):
        return ValueRule(_INT)
    floats = "float" in left.kinds or "float" in right.kinds or "null" in left.kinds | right.kinds
    if isinstance(operator, ast.Div) or floats:
        return ValueRule(_FLOAT | _NULL)
    return ValueRule(_INT)


def _infer(node: ast.AST, lookup: Callable[[str], ValueRule]) -> ValueRule:
    """What an expression can evaluate to: its kinds, and its values when every branch
    is a literal (``'open' if door_open else 'closed'``). ANY when unsure."""
    if isinstance(node, ast.Expression):
        return _infer(node.body, lookup)
    if isinstance(node, ast.Constant):
        return _constant_rule(node.value)
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return ValueRule(_FLOAT)
        return _strip_bounds(lookup(node.id))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return _strip_bounds(lookup(f"{node.value.id}.{node.attr}"))
    if isinstance(node, ast.Compare | ast.BoolOp):
        return ValueRule(_BOOL)
    if isinstance(node, ast.UnaryOp):
        operand = _infer(node.operand, lookup)
        if isinstance(node.op, ast.Not):
            return ValueRule(_BOOL)
        if operand.is_any or operand.alternatives:
            return ANY
        if isinstance(node.op, ast.Invert):
            return ValueRule(_BOOL) if operand.kinds == _BOOL else ValueRule(_INT)
        kinds = (operand.kinds - _BOOL) | (_INT if "bool" in operand.kinds else frozenset())
        return ValueRule(kinds) if kinds <= _NUMBER | _NULL and kinds else ANY
    if isinstance(node, ast.BinOp):
        return _arithmetic(node.op, _infer(node.left, lookup), _infer(node.right, lookup))
    if isinstance(node, ast.IfExp):
        body, orelse = _infer(node.body, lookup), _infer(node.orelse, lookup)
        if body.is_any or orelse.is_any:
            return ANY
        kinds = _all_kinds(body) | _all_kinds(orelse)
        # numpy.where gives both branches one dtype: text beside anything else makes
        # everything text (give up), booleans beside numbers become numbers.
        if "str" in kinds and kinds != _STR:
            return ANY
        if "bool" in kinds and kinds & _NUMBER:
            return ValueRule(kinds | _NUMBER)
        return _union([body, orelse])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name == "int":
            return ValueRule(_INT)
        if name == "float":
            return ValueRule(_FLOAT | _NULL)
        if name == "bool":
            return ValueRule(_BOOL)
        if name in _FLOAT_FUNCTIONS or name in _FLOAT_FUNCTIONS_OF_ANY:
            return ValueRule(_FLOAT | _NULL)
        if name in _NUMERIC_FUNCTIONS:
            arguments = [_infer(argument, lookup) for argument in node.args]
            if name == "round" and len(arguments) == 2:  # round(x, n): the kind of x
                arguments = arguments[:1]
            found: frozenset[str] = frozenset()
            for argument in arguments:
                if argument.is_any or argument.alternatives:
                    return ANY
                found |= argument.kinds
            if not found <= _NUMBER | _BOOL | _NULL:
                return ANY
            return ValueRule(_FLOAT | _NULL) if found & (_FLOAT | _NULL) else ValueRule(_INT)
    return ANY


# ---------------------------------------------------------------------------------------
# Compiling rules into checks
# ---------------------------------------------------------------------------------------


def _accept(_value: Any) -> _Problem | None:
    return None


def _number_text(number: float) -> str:
    """A bound as text: ``40`` rather than ``40.0``."""
    if isinstance(number, float) and number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def _show(value: Any) -> str:
    """A received value as text, shortened."""
    if type(value) is float:
        # Values decoded from binary frames carry scaling noise: 40.300000000000004.
        text = repr(round(value, 9)) if math.isfinite(value) else repr(value)
    else:
        text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


def _describe(kinds: frozenset[str]) -> str:
    words = [
        _KIND_WORDS[kind]
        for kind in ("int", "float", "bool", "str", "null", "map", "list", "bytes")
        if kind in kinds and not (kind == "int" and "float" in kinds)
    ]
    return " or ".join(words) or "a value"


def _choices_text(choices: Sequence[Any]) -> str:
    shown = ", ".join(_show(choice) for choice in choices[:_MAX_SHOWN_CHOICES])
    return shown + (", ..." if len(choices) > _MAX_SHOWN_CHOICES else "")


def _epsilon(bound: float) -> float:
    """Float noise allowed around a bound."""
    return 1e-9 * max(1.0, abs(bound))


def _membership(choices: tuple[Any, ...]) -> Callable[[Any], bool]:
    """``value in choices``, by a set when the choices allow it."""
    try:
        lookup = frozenset(choices)
    except TypeError:
        lookup = None

    def contains(value: Any) -> bool:
        if lookup is not None:
            try:
                return value in lookup
            except TypeError:  # an unhashable value (a list) is in no set of scalars
                return False
        return any(value == choice for choice in choices)

    return contains


_PYTHON_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "int": (int,),
    "float": (float, int),  # a number rule takes integers too
    "bool": (bool,),
    "str": (str,),
    "null": (type(None),),
    "map": (dict,),
    "list": (list, tuple),
    "bytes": (bytes,),
}


def _python_types(kinds: frozenset[str]) -> frozenset[type]:
    """The Python types of decoded values that pass a rule's type test."""
    return frozenset(kind for name in kinds for kind in _PYTHON_TYPES.get(name, ()))


def _compile_rule(rule: ValueRule) -> _ValueCheck:
    """The check of one decoded value against a rule; None means it conforms. Common
    shapes get a check of their own: the per-message path runs these."""
    if rule.alternatives:
        checks = tuple(_compile_rule(alternative) for alternative in rule.alternatives)

        def any_of(value: Any) -> _Problem | None:
            first = None
            for check in checks:
                problem = check(value)
                if problem is None:
                    return None
                if first is None:
                    first = problem
            return first

        return any_of
    if rule.is_any:
        return _accept
    if rule.choices is None and rule.pattern is None and rule.parts is None:
        if not rule.has_bounds and not rule.finite:
            return _kind_check(rule)
        if rule.kinds <= _NUMBER | _NULL:
            return _number_check(rule)
    return _general_check(rule)


def _kind_check(rule: ValueRule) -> _ValueCheck:
    """Of the right type, nothing more (booleans, expressions, free strings)."""
    types = _python_types(rule.kinds)
    rank, expected = rule.rank, _describe(rule.kinds)

    def check(value: Any) -> _Problem | None:
        if type(value) in types:
            return None
        return _Problem(rank, "", f"expected {expected}, got {_show(value)}")

    return check


def _number_check(rule: ValueRule) -> _ValueCheck:
    """A number within bounds (null too, where NaN may have become a JSON null)."""
    types = _python_types(rule.kinds)
    rank, expected, finite = rule.rank, _describe(rule.kinds), rule.finite
    minimum, maximum, below = rule.minimum, rule.maximum, rule.below
    low = -math.inf if minimum is None else minimum - rule.slack - _epsilon(minimum)
    high = math.inf if maximum is None else maximum + rule.slack + _epsilon(maximum)
    limit = math.inf if below is None else below
    texts = {
        "min": "" if minimum is None else _number_text(minimum),
        "max": "" if maximum is None else _number_text(maximum),
        "below": "" if below is None else _number_text(below),
    }
    isfinite = math.isfinite

    def check(value: Any) -> _Problem | None:
        kind = type(value)
        if kind not in types:
            return _Problem(rank, "", f"expected {expected}, got {_show(value)}")
        if kind is not float and kind is not int:
            return None  # null
        if low <= value <= high and value < limit and (not finite or isfinite(value)):
            return None
        if not isfinite(value) and finite:
            return _Problem(rank, "", f"expected a finite number, got {_show(value)}")
        if value < low:
            return _Problem(rank, "", f"{_show(value)} below min {texts['min']}")
        if value > high:
            return _Problem(rank, "", f"{_show(value)} above max {texts['max']}")
        if value >= limit:
            return _Problem(rank, "", f"{_show(value)} not below {texts['below']}")
        return None  # NaN where it may be: no bound applies

    return check


def _general_check(rule: ValueRule) -> _ValueCheck:
    """Any rule: type, bounds, choices, pattern, parts, in that order."""
    types = _python_types(rule.kinds)
    rank, expected = rule.rank, _describe(rule.kinds)
    bounds = _number_check(replace(rule, kinds=_NUMBER, choices=None, pattern=None, parts=None))
    numeric = rule.has_bounds or rule.finite
    choices = rule.choices
    contains = None if choices is None else _membership(choices)
    if choices is not None and len(choices) == 1:
        choice_text = _show(choices[0])
    elif choices is not None:
        choice_text = "one of " + _choices_text(choices)
    else:
        choice_text = ""
    pattern = None if rule.pattern is None else re.compile(rule.pattern, re.DOTALL)
    pattern_name = rule.pattern_name
    parts = (
        None
        if rule.parts is None
        else tuple((key, _compile_rule(part)) for key, part in rule.parts)
    )
    part_keys = frozenset(key for key, _ in parts or ())

    def check(value: Any) -> _Problem | None:
        kind = type(value)
        if kind not in types:
            return _Problem(rank, "", f"expected {expected}, got {_show(value)}")
        if numeric and (kind is int or kind is float):
            problem = bounds(value)
            if problem is not None:
                return _Problem(rank, problem.where, problem.text)
        if contains is not None and not contains(value):
            return _Problem(rank, "", f"{_show(value)} is not {choice_text}")
        if pattern is not None and kind is str and pattern.fullmatch(value) is None:
            return _Problem(rank, "", f"{_show(value)} is not {pattern_name}")
        if parts is not None:
            return _check_parts(value, parts, part_keys)
        return None

    return check


def _check_parts(
    value: Any, parts: tuple[tuple[str, _ValueCheck], ...], keys: frozenset[str]
) -> _Problem | None:
    """A mapping of exactly ``keys`` whose values pass their checks (a GPS position)."""
    if value.keys() != keys:
        for key, _ in parts:
            if key not in value:
                return _Problem(_SHAPE, f".{key}", "missing key")
        extra = next(key for key in value if key not in keys)
        return _Problem(_SHAPE, f".{extra}", "unexpected key")
    for key, part in parts:
        problem = part(value[key])
        if problem is not None:
            return _Problem(problem.rank, f".{key}{problem.where}", problem.text)
    return None


def _compile_approximate(
    rule: ValueRule, absolute: float, relative: float = 0.0
) -> _NumberCheck | None:
    """The check of a number that went through scaling, a float type or a format spec:
    bounds and numeric choices within ``absolute + relative * |value|``. Booleans are
    0 or 1. None when the rule says nothing a number can break."""
    if rule.alternatives:
        checks = [
            _compile_approximate(alternative, absolute, relative)
            for alternative in rule.alternatives
        ]
        if any(check is None for check in checks):
            return None
        found = [check for check in checks if check is not None]

        def any_of(value: float) -> _Problem | None:
            first = None
            for check in found:
                problem = check(value)
                if problem is None:
                    return None
                if first is None:
                    first = problem
            return first

        return any_of
    kinds = rule.kinds
    if not kinds or "str" in kinds:
        return None
    rank = rule.rank
    if not kinds & _NUMBER:
        if "bool" not in kinds:
            return None

        def boolean(value: float) -> _Problem | None:
            if abs(value) <= absolute or abs(value - 1) <= absolute:
                return None
            return _Problem(rank, "", f"{_show(value)} is not a boolean (0 or 1)")

        return boolean
    minimum, maximum, below = rule.minimum, rule.maximum, rule.below
    slack = rule.slack
    numbers = (
        None
        if rule.choices is None
        else [float(choice) for choice in rule.choices if _tag(choice) in ("int", "float", "bool")]
    )
    choice_text = "" if rule.choices is None else _choices_text(rule.choices)
    if minimum is None and maximum is None and below is None and numbers is None:
        return None
    low = None if minimum is None else minimum - slack - _epsilon(minimum)
    high = None if maximum is None else maximum + slack + _epsilon(maximum)
    min_text = "" if minimum is None else _number_text(minimum)
    max_text = "" if maximum is None else _number_text(maximum)
    below_text = "" if below is None else _number_text(below)

    def check(value: float) -> _Problem | None:
        allowance = absolute + relative * abs(value)
        if low is not None and value < low - allowance:
            return _Problem(rank, "", f"{_show(value)} below min {min_text}")
        if high is not None and value > high + allowance:
            return _Problem(rank, "", f"{_show(value)} above max {max_text}")
        if below is not None and value >= below + allowance:
            return _Problem(rank, "", f"{_show(value)} not below {below_text}")
        if numbers is not None and not any(
            abs(value - number) <= allowance + _epsilon(number) for number in numbers
        ):
            return _Problem(rank, "", f"{_show(value)} is not one of {choice_text}")
        return None

    return check


def _render(value: Any, style: str) -> str:
    """A value as a text template (``python``: str.format) or an interpolation or CSV
    cell (``render``: true/false, empty for null) writes it."""
    return format(value, "") if style == "python" else render_value(value)


def _text_fragment(rule: ValueRule, style: str, spec: str, conversion: str | None) -> str:
    """A regex for the text a value of ``rule`` becomes in a template (no groups)."""
    if conversion:
        return _ANYTHING
    if rule.alternatives:
        fragments = {
            _text_fragment(alternative, style, spec, conversion)
            for alternative in rule.alternatives
        }
        if _ANYTHING in fragments:
            return _ANYTHING
        if len(fragments) == 1:
            return fragments.pop()
        return "|".join(f"(?:{fragment})" for fragment in sorted(fragments))
    if spec:
        match = _NUMBER_SPEC.fullmatch(spec)
        if match is None or not rule.is_numeric:
            return _ANYTHING
        # Digits grouped by the spec (`{x:,}`) carry its separator.
        grouping = match.group("grouping") or ""
        if (
            rule.kinds <= _INT
            and match.group("type") in (None, "d")
            and not match.group("precision")
        ):
            return _FORMATTED_INTEGER.replace("]", f"{grouping}]")
        return _FORMATTED_NUMBER.replace("]", f"{grouping}]")
    if rule.choices is not None and len(rule.choices) <= _MAX_REGEX_CHOICES:
        if any(
            _tag(choice) not in ("str", "int", "float", "bool", "null") for choice in rule.choices
        ):
            return _ANYTHING
        texts = {_render(choice, style) for choice in rule.choices}
        return "|".join(re.escape(text) for text in sorted(texts, key=len, reverse=True))
    if rule.pattern is not None and rule.kinds == _STR:
        return rule.pattern
    if rule.kinds == _BOOL:
        return "True|False" if style == "python" else "true|false"
    if rule.kinds == _INT:
        return _INTEGER
    return _ANYTHING


def _parse_text(text: str, kinds: frozenset[str], style: str) -> list[Any]:
    """The values of the admitted kinds that render as ``text``."""
    values: list[Any] = []
    if "bool" in kinds:
        true, false = ("True", "False") if style == "python" else ("true", "false")
        if text in (true, false):
            values.append(text == true)
    if "null" in kinds and text == ("None" if style == "python" else ""):
        values.append(None)
    if kinds & _NUMBER:
        if _INTEGER_TEXT.fullmatch(text):
            values.append(int(text))
        elif "float" in kinds:
            with contextlib.suppress(ValueError):
                values.append(float(text))
    if "str" in kinds:
        values.append(text)
    return values


def _compile_text(
    rule: ValueRule, style: str, spec: str, conversion: str | None
) -> _ValueCheck | None:
    """The check of the text a value became in a template, or None if it cannot be
    checked (a conversion, a spec that formats other than numbers, an object)."""
    if conversion or rule.is_any or rule.parts is not None:
        return None
    if rule.alternatives:
        alternatives = [
            _compile_text(alternative, style, spec, conversion) for alternative in rule.alternatives
        ]
        if any(alternative is None for alternative in alternatives):
            return None
        found = [alternative for alternative in alternatives if alternative is not None]

        def any_of(text: str) -> _Problem | None:
            first = None
            for check in found:
                problem = check(text)
                if problem is None:
                    return None
                if first is None:
                    first = problem
            return first

        return any_of
    if spec:
        return _compile_formatted(rule, spec)
    kinds = rule.kinds
    if kinds == _STR and rule.choices is None and rule.pattern is None:
        return None
    value_check = _compile_rule(rule)
    expected = _describe(kinds)
    rank = rule.rank

    def check(text: str) -> _Problem | None:
        first = None
        for value in _parse_text(text, kinds, style):
            problem = value_check(value)
            if problem is None:
                return None
            if first is None:
                first = problem
        return first or _Problem(rank, "", f"expected {expected}, got {_show(text)}")

    return check


def _compile_formatted(rule: ValueRule, spec: str) -> _ValueCheck | None:
    """The check of a number written with a format spec such as ``.1f`` or ``05d``:
    within the rounding the spec allows. Specs that round relatively (``e``, ``g``)
    or scale (``%``) only say it is a number."""
    match = _NUMBER_SPEC.fullmatch(spec)
    if match is None or not rule.is_numeric:
        return None
    kind, precision = match.group("type"), match.group("precision")
    approximate: _NumberCheck | None = None
    if kind in ("f", "F"):
        digits = int(precision) if precision is not None else 6
        approximate = _compile_approximate(rule, 0.5 * 10.0**-digits)
    elif kind == "d" or (kind is None and precision is None):
        approximate = _compile_approximate(rule, 0.0)
    rank = rule.rank

    def check(text: str) -> _Problem | None:
        try:
            value = float(text.strip().replace(",", "").replace("_", "").rstrip("%"))
        except ValueError:
            return _Problem(rank, "", f"expected a number, got {_show(text)}")
        return None if approximate is None else approximate(value)

    return check


# ---------------------------------------------------------------------------------------
# The rules of one model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """Which message a payload belongs to: the names only it defines, and the states
    it can be sent in (which decide the field generators in force)."""

    constants: Mapping[str, ValueRule]
    states: frozenset[str]


class _ModelRules:
    """The :class:`ValueRule` of every name a model's payloads and topics can read."""

    def __init__(self, spec: DeviceModelSpec, base_dir: Path | None) -> None:
        self.spec = spec
        self._base_dir = base_dir
        machine = spec.states
        self.all_states = (
            frozenset(machine.states) if machine is not None else frozenset({"default"})
        )
        self._overrides: dict[str, dict[str, FieldSpec]] = {}
        if machine is not None:
            for state_name, state in machine.states.items():
                for name, field_spec in state.fields.items():
                    self._overrides.setdefault(name, {})[state_name] = field_spec
        # What commands set each field to: expressions over `payload` and the device.
        self._set_by_commands: dict[str, list[str]] = {}
        for handler in spec.commands.handlers.values() if spec.commands else ():
            for name, source in handler.set.items():
                self._set_by_commands.setdefault(name, []).append(source)
        self._field_rules: dict[tuple[str, frozenset[str]], ValueRule] = {}
        self._inferring: set[str] = set()
        self._tables: dict[Path, ReplayTable | None] = {}
        self.attributes: dict[str, ValueRule] = {}
        self.builtins: dict[str, ValueRule] = {
            "index": ValueRule(_INT, minimum=0),
            "model": _constant_rule(spec.name),
            "t": ValueRule(_FLOAT, minimum=0, finite=True),
            "ts": ValueRule(_FLOAT, finite=True),
            "ts_ms": ValueRule(_INT),
            "state_s": ValueRule(_FLOAT, minimum=0, finite=True),
        }
        # In order: an attribute may read the ones before it; the id reads them all.
        for name, attribute in spec.attributes.items():
            self.attributes[name] = self._attribute_rule(attribute)
        id_pattern = self.template_regex(spec.id, self.static_rule)
        self.builtins["device_id"] = ValueRule(
            _STR, pattern=id_pattern, pattern_name=f"a device id of the form {spec.id!r}"
        )

    # -- lookups -----------------------------------------------------------------------

    def static_rule(self, name: str) -> ValueRule:
        """Names of ids, attribute templates and topics: index, model, the attributes."""
        if name in self.attributes:
            return self.attributes[name]
        return self.builtins.get(name, ANY)

    def rule(self, name: str, context: _Context) -> ValueRule:
        """The rule of a name read by a payload of ``context``, found where the runtime
        finds it: the message's own names, then fields, attributes, built-ins."""
        if name in context.constants:
            return context.constants[name]
        if name in self.spec.fields:
            return self.field_rule(name, context.states)
        head, dot, part = name.partition(".")
        if dot and head in self.spec.fields:
            whole = self.field_rule(head, self.all_states)
            for key, part_rule in whole.parts or ():
                if key == part:
                    return part_rule
            return ANY
        if name in self.attributes:
            return self.attributes[name]
        if name == "state":
            return _choice_rule(sorted(context.states))
        return self.builtins.get(name, ANY)

    def _any_state_lookup(self, name: str) -> ValueRule:
        return self.rule(name, _Context({}, self.all_states))

    # -- regexes of templates ----------------------------------------------------------

    def template_regex(
        self,
        template: str,
        lookup: Callable[[str], ValueRule],
        *,
        capture_device_id: bool = False,
    ) -> str:
        """The regex of what a ``str.format`` template renders to (ids, topics, template
        attributes and fields); with ``capture_device_id``, the device id is the group
        ``device_id`` (and repeats of it back-reference it)."""
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError:
            return re.escape(template)
        pieces: list[str] = []
        captured = False
        for literal, name, spec, conversion in parsed:
            pieces.append(re.escape(literal))
            if name is None:
                continue
            rule = lookup(name) if _NAME.fullmatch(name) else ANY
            fragment = _text_fragment(rule, "python", spec or "", conversion)
            if capture_device_id and name == "device_id":
                pieces.append("(?P=device_id)" if captured else f"(?P<device_id>{fragment})")
                captured = True
            else:
                pieces.append(f"(?:{fragment})")
        return "".join(pieces)

    # -- attributes --------------------------------------------------------------------

    def _attribute_rule(self, attribute: Any) -> ValueRule:
        if isinstance(attribute, ExpressionAttributeSpec):
            try:
                tree = ast.parse(attribute.expr.strip(), mode="eval")
            except SyntaxError:
                return ANY
            return _infer(tree, self.static_rule)
        if isinstance(attribute, TemplateAttributeSpec):
            pattern = self.template_regex(attribute.template, self.static_rule)
            return ValueRule(
                _STR, pattern=pattern, pattern_name=f"text of the form {attribute.template!r}"
            )
        return _distribution_rule(attribute)

    # -- fields ------------------------------------------------------------------------

    def field_rule(self, name: str, states: frozenset[str]) -> ValueRule:
        """A field's rule while the device is in one of ``states``: the union of the
        generators in force there (the model's, and the states' overrides)."""
        key = (name, states)
        cached = self._field_rules.get(key)
        if cached is not None:
            return cached
        if name in self._inferring:  # a cycle, which the loader refuses anyway
            return ANY
        self._inferring.add(name)
        try:
            overrides = self._overrides.get(name, {})
            specs: list[FieldSpec] = []
            if any(state not in overrides for state in states):
                specs.append(self.spec.fields[name])
            specs.extend(overrides[state] for state in sorted(states) if state in overrides)
            rule = _union([self._generator_rule(name, field_spec) for field_spec in specs])
        finally:
            self._inferring.discard(name)
        self._field_rules[key] = rule
        return rule

    def _generator_rule(self, name: str, spec: FieldSpec) -> ValueRule:
        """What one generator produces (see the module doc for what is left out)."""
        set_by_command = name in self._set_by_commands
        if isinstance(spec, ConstantFieldSpec):
            rule = _distribution_rule(spec.value)
            if set_by_command:  # or whatever the commands' expressions give
                rule = _union([rule, *map(self._inferred, self._set_by_commands[name])])
            return rule
        if isinstance(spec, CounterFieldSpec):
            rule = _counter_rule(spec)
            if set_by_command:  # it counts on from whatever it was set to
                return ValueRule(rule.kinds, finite=True)
            return rule
        if isinstance(spec, UniformFieldSpec):
            low, high = _param_range(spec.low), _param_range(spec.high)
            if low is None or high is None:
                return _number_rule(spec.round)
            return _number_rule(spec.round, min(low[0], high[0]), max(low[1], high[1]))
        if isinstance(spec, GaussianFieldSpec | RandomWalkFieldSpec):
            return _number_rule(spec.round, spec.min, spec.max)
        if isinstance(spec, WaveFieldSpec):
            return _wave_rule(spec)
        if isinstance(spec, WeightedChoiceFieldSpec):
            return _choice_rule(spec.values)
        if isinstance(spec, BooleanFieldSpec):
            return ValueRule(_BOOL)
        if isinstance(spec, TimestampFieldSpec):
            if spec.format == "epoch_ms":
                return ValueRule(_INT)
            if spec.format == "epoch_s":
                return ValueRule(_FLOAT, finite=True)
            return ValueRule(
                _STR, pattern=_ISO8601_MS, pattern_name="an ISO 8601 UTC time with milliseconds"
            )
        if isinstance(spec, UUIDFieldSpec):
            return ValueRule(_STR, pattern=_UUID4, pattern_name="a version 4 UUID")
        if isinstance(spec, TemplateFieldSpec):
            pattern = self.template_regex(spec.template, self._any_state_lookup)
            return ValueRule(
                _STR, pattern=pattern, pattern_name=f"text of the form {spec.template!r}"
            )
        if isinstance(spec, GPSAreaFieldSpec):
            return _gps_area_rule(spec)
        if isinstance(spec, GPSRouteFieldSpec):
            return _gps_route_rule(spec)
        if isinstance(spec, ReplayFieldSpec):
            return self._replay_rule(spec)
        return self._expression_rule(spec)

    def _inferred(self, source: str) -> ValueRule:
        """What an expression over the device's names gives."""
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError:
            return ANY
        return _infer(tree, self._any_state_lookup)

    def _expression_rule(self, spec: ExpressionFieldSpec) -> ValueRule:
        rule = self._inferred(spec.expr)
        if spec.round is not None and rule.choices is not None and "float" in rule.kinds:
            rule = ValueRule(rule.kinds)  # rounding moves literal floats
        return rule

    def _replay_rule(self, spec: ReplayFieldSpec) -> ValueRule:
        """A numeric column: within its range; a text column: one of its values."""
        path = (
            spec.file
            if spec.file.is_absolute() or self._base_dir is None
            else self._base_dir / spec.file
        )
        if path not in self._tables:
            try:
                self._tables[path] = ReplayTable.load(path)
            except ReplayError:
                self._tables[path] = None
        table = self._tables[path]
        if table is None or spec.column not in table.columns:
            return ANY
        column = table.columns[spec.column]
        if column.dtype.kind != "f":
            return _choice_rule(list(dict.fromkeys(column.tolist())))
        finite = column[np.isfinite(column)]
        if len(finite) == 0:
            return ValueRule(_FLOAT | _NULL)
        everything_finite = len(finite) == len(column)
        return ValueRule(
            _FLOAT if everything_finite else _FLOAT | _NULL,
            minimum=float(finite.min()),
            maximum=float(finite.max()),
            finite=everything_finite,
        )


def _counter_rule(spec: CounterFieldSpec) -> ValueRule:
    """From ``start`` up (or down) by ``step``, below ``wrap_at`` when counting up."""
    integral = (
        all(
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and float(value).is_integer()
            for value in (spec.start, spec.step)
        )
        and (spec.wrap_at is None or float(spec.wrap_at).is_integer())
        and spec.round is None
    )
    start, step = _param_range(spec.start), _param_range(spec.step)
    minimum = maximum = below = None
    if start is not None and step is not None:
        if step[0] >= 0:
            minimum = start[0]
            wrap_at = spec.wrap_at
            if wrap_at is not None and start[1] < wrap_at:
                if integral:
                    maximum = wrap_at - 1
                elif spec.round is not None:
                    maximum = wrap_at
                else:
                    below = wrap_at
        if step[1] <= 0:
            maximum = start[1]
    return _number_rule(spec.round, minimum, maximum, below=below, integral=integral)


def _wave_rule(spec: WaveFieldSpec) -> ValueRule:
    """``offset ± |amplitude|`` without noise; any number with it."""
    offset, amplitude = _param_range(spec.offset), _param_range(spec.amplitude)
    noise = _param_range(spec.noise)
    if offset is None or amplitude is None or noise != (0.0, 0.0):
        return _number_rule(spec.round)
    swing = max(abs(amplitude[0]), abs(amplitude[1]))
    return _number_rule(spec.round, offset[0] - swing, offset[1] + swing)


def _gps_rule(lat: ValueRule, lon: ValueRule, heading: ValueRule, speed: ValueRule) -> ValueRule:
    parts = (("lat", lat), ("lon", lon), ("heading", heading), ("speed", speed))
    return ValueRule(_MAP, parts=parts)


# GPS coordinates are rounded to 7 decimals.
_GPS_SLACK: Final = 5e-8


def _gps_area_rule(spec: GPSAreaFieldSpec) -> ValueRule:
    """Within the circle without jitter (jitter is gaussian: unbounded)."""
    zero = _constant_rule(0.0)
    if spec.jitter_m > 0:
        coordinate = ValueRule(_FLOAT, finite=True)
        return _gps_rule(coordinate, coordinate, zero, zero)
    centre = spec.center
    lat_swing = math.degrees(spec.radius_m / EARTH_RADIUS_M)
    lon_swing = math.degrees(
        spec.radius_m / (EARTH_RADIUS_M * max(math.cos(math.radians(centre.lat)), 1e-12))
    )
    lat = ValueRule(
        _FLOAT,
        minimum=centre.lat - lat_swing,
        maximum=centre.lat + lat_swing,
        slack=_GPS_SLACK,
        finite=True,
    )
    lon = ValueRule(
        _FLOAT,
        minimum=centre.lon - lon_swing,
        maximum=centre.lon + lon_swing,
        slack=_GPS_SLACK,
        finite=True,
    )
    return _gps_rule(lat, lon, zero, zero)


def _gps_route_rule(spec: GPSRouteFieldSpec) -> ValueRule:
    """Within the bounding box of the waypoints (legs are straight in lat/lon)."""
    points = [point for route in spec.routes for point in route]
    lat = ValueRule(
        _FLOAT,
        minimum=min(p.lat for p in points),
        maximum=max(p.lat for p in points),
        slack=_GPS_SLACK,
        finite=True,
    )
    lon = ValueRule(
        _FLOAT,
        minimum=min(p.lon for p in points),
        maximum=max(p.lon for p in points),
        slack=_GPS_SLACK,
        finite=True,
    )
    heading = ValueRule(_FLOAT, minimum=0.0, maximum=360.0, slack=0.05, finite=True)
    speed_range = _param_range(spec.speed_mps)
    speed = (
        ValueRule(_FLOAT, finite=True)
        if speed_range is None
        else ValueRule(_FLOAT, minimum=speed_range[0], maximum=speed_range[1], finite=True)
    )
    return _gps_rule(lat, lon, heading, speed)


# ---------------------------------------------------------------------------------------
# Compiling payloads
# ---------------------------------------------------------------------------------------


class _Scope:
    """The names one message's payload reads, each compiled into a check once."""

    def __init__(self, rules: _ModelRules, context: _Context) -> None:
        self.rules = rules
        self.context = context
        self._checks: dict[str, _ValueCheck] = {}

    def rule(self, name: str) -> ValueRule:
        return self.rules.rule(name, self.context)

    def value_check(self, name: str) -> _ValueCheck:
        found = self._checks.get(name)
        if found is None:
            found = self._checks[name] = _compile_rule(self.rule(name))
        return found

    def leaf(self, name: str, path: str) -> _Check:
        """The check of a value of ``name`` found at ``path``; a ``device_id`` must
        also be the one the topic carries."""
        value_check = self.value_check(name)
        if name == "device_id":
            return _device_id_check(value_check, path)

        def check(value: Any, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
            problem = value_check(value)
            if problem is None:
                return None
            return _Problem(problem.rank, path + problem.where, problem.text)

        return check

    def text_leaf(
        self, name: str, path: str, style: str, spec: str, conversion: str | None
    ) -> _Check | None:
        """The check of the text ``name`` became, found at ``path``; None if it
        cannot be checked."""
        text_check = _compile_text(self.rule(name), style, spec, conversion)
        if name == "device_id" and not spec and not conversion:
            return _device_id_check(text_check or _accept, path)
        if text_check is None:
            return None
        found = text_check

        def check(text: Any, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
            problem = found(text)
            if problem is None:
                return None
            return _Problem(problem.rank, path + problem.where, problem.text)

        return check


def _device_id_check(value_check: _ValueCheck, path: str) -> _Check:
    """A device id: by its rule, and the same as the topic's when the topic has one."""

    def check(value: Any, topic_id: str | None) -> _Problem | None:
        problem = value_check(value)
        if problem is None:
            if topic_id is None or value == topic_id:
                return None
            problem = _Problem(_VALUE, "", f"{_show(value)} is not the topic's {topic_id!r}")
        return _Problem(problem.rank, path + problem.where, problem.text)

    return check


def _wire_key(key: Any, kind: str) -> Any:
    """A constant mapping key as it arrives: JSON writes non-text keys as text."""
    if isinstance(key, str):
        return "".join(str(part) for part in parse_placeholders(key))
    if kind == "json":
        return next(iter(orjson.loads(orjson.dumps({key: 0}, option=orjson.OPT_NON_STR_KEYS))))
    return key


def _same_constant(value: Any, constant: Any) -> bool:
    """Equal, and of the same type family (1 is not True, 1 is 1.0)."""
    if _tag(value) != _tag(constant) and not (
        _tag(value) in ("int", "float") and _tag(constant) in ("int", "float")
    ):
        return False
    return bool(value == constant)


def _mapping_node(
    items: Sequence[tuple[Any, _Check]],
    path: str,
    size: int,
) -> _Check:
    """A mapping with exactly the keys of ``items`` (and ``size - len(items)`` keys
    interpolated from values, which are not checked)."""
    keys = frozenset(key for key, _ in items)
    exact = size == len(items)

    def check(value: Any, topic_id: str | None) -> _Problem | None:
        if type(value) is not dict:
            return _Problem(_SHAPE, path, f"expected an object, got {_show(value)}")
        if exact and value.keys() != keys:
            for key, _ in items:
                if key not in value:
                    return _Problem(_SHAPE, f"{path}.{key}", "missing key")
            extra = next(key for key in value if key not in keys)
            return _Problem(_SHAPE, f"{path}.{extra}", "unexpected key")
        if not exact:
            for key, _ in items:
                if key not in value:
                    return _Problem(_SHAPE, f"{path}.{key}", "missing key")
            if len(value) > size:
                return _Problem(_SHAPE, path, f"expected at most {size} keys, got {len(value)}")
        for key, child in items:
            problem = child(value[key], topic_id)
            if problem is not None:
                return problem
        return None

    return check


def _interpolation_node(
    parts: Sequence[str | Placeholder], text: str, path: str, scope: _Scope
) -> _Check:
    """A string with placeholders inside text: a regex with one group per placeholder."""
    pieces: list[str] = []
    checks: list[_Check | None] = []
    fragments: list[str] = []
    for part in parts:
        if isinstance(part, Placeholder):
            rule = scope.rule(part.name)
            fragment = _text_fragment(rule, "render", part.format_spec or "", None)
            fragments.append(fragment)
            pieces.append(f"({fragment})")
            checks.append(scope.text_leaf(part.name, path, "render", part.format_spec or "", None))
        else:
            fragments.append("")
            pieces.append(re.escape(part))
    _drop_ambiguous(fragments, checks)
    pattern = re.compile("".join(pieces), re.DOTALL)
    located = [(index + 1, check) for index, check in enumerate(checks) if check is not None]

    def check(value: Any, topic_id: str | None) -> _Problem | None:
        if type(value) is not str:
            return _Problem(_SHAPE, path, f"expected a string, got {_show(value)}")
        match = pattern.fullmatch(value)
        if match is None:
            return _Problem(_SHAPE, path, f"{_show(value)} does not match {text!r}")
        for group, group_check in located:
            problem = group_check(match.group(group), topic_id)
            if problem is not None:
                return problem
        return None

    return check


def _drop_ambiguous(fragments: list[str], checks: list[_Check | None]) -> None:
    """Two free-text placeholders side by side split their text unknowably: leave both
    unchecked. ``fragments`` has "" for literal text; ``checks`` aligns with the
    placeholders only."""
    placeholder = -1
    previous_free: int | None = None
    for fragment in fragments:
        if fragment == "":
            previous_free = None
            continue
        placeholder += 1
        free = fragment in _FREE_FRAGMENTS
        if free and previous_free is not None:
            checks[previous_free] = None
            checks[placeholder] = None
        previous_free = placeholder if free else None


def _template_node(template: Any, path: str, scope: _Scope, kind: str) -> _Check:
    """The check of one node of a json/cbor/msgpack template."""
    if isinstance(template, dict):
        items = []
        for key, value in template.items():
            if isinstance(key, str) and any(
                isinstance(part, Placeholder) for part in parse_placeholders(key)
            ):
                continue  # an interpolated key: its value is not checked
            wire = _wire_key(key, kind)
            items.append((wire, _template_node(value, f"{path}.{wire}", scope, kind)))
        return _mapping_node(items, path, len(template))
    if isinstance(template, list | tuple):
        children = [
            _template_node(item, f"{path}[{index}]", scope, kind)
            for index, item in enumerate(template)
        ]
        size = len(children)

        def check_list(value: Any, topic_id: str | None) -> _Problem | None:
            if type(value) is not list:
                return _Problem(_SHAPE, path, f"expected a list, got {_show(value)}")
            if len(value) != size:
                return _Problem(_SHAPE, path, f"expected {size} items, got {len(value)}")
            for child, item in zip(children, value, strict=True):
                problem = child(item, topic_id)
                if problem is not None:
                    return problem
            return None

        return check_list
    if isinstance(template, str):
        parts = parse_placeholders(template)
        if not any(isinstance(part, Placeholder) for part in parts):
            return _constant_node("".join(str(part) for part in parts), path)
        first = parts[0]
        if len(parts) == 1 and isinstance(first, Placeholder) and first.format_spec is None:
            return scope.leaf(first.name, path)
        return _interpolation_node(parts, template, path, scope)
    return _constant_node(template, path)


def _constant_node(constant: Any, path: str) -> _Check:
    def check(value: Any, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
        if _same_constant(value, constant):
            return None
        return _Problem(_SHAPE, path, f"expected {_show(constant)}, got {_show(value)}")

    return check


def _undecodable(exc: PayloadError) -> _Problem:
    return _Problem(_UNDECODABLE, "", str(exc))


def _compile_payload(
    spec: PayloadSpec, default_names: Sequence[str], scope: _Scope
) -> _PayloadCheck:
    """The check of a message's payload bytes."""
    if isinstance(spec, JSONPayloadSpec | CBORPayloadSpec | MsgPackPayloadSpec):
        return _compile_document(spec, default_names, scope)
    if isinstance(spec, TextPayloadSpec):
        return _compile_text_payload(spec, scope)
    if isinstance(spec, CSVPayloadSpec):
        return _compile_csv(spec, default_names, scope)
    if isinstance(spec, BinaryPayloadSpec):
        return _compile_binary(spec, scope)
    return _compile_raw(spec)


def _compile_document(
    spec: JSONPayloadSpec | CBORPayloadSpec | MsgPackPayloadSpec,
    default_names: Sequence[str],
    scope: _Scope,
) -> _PayloadCheck:
    decode = build_encoder(spec, default_names=default_names).decode
    if spec.template is None:
        names = list(dict.fromkeys(default_names))
        node = _mapping_node(
            [(name, scope.leaf(name, f".{name}")) for name in names], "", len(names)
        )
    else:
        node = _template_node(spec.template, "", scope, spec.kind)

    def check(payload: bytes, topic_id: str | None) -> _Problem | None:
        try:
            document = decode(payload)
        except PayloadError as exc:
            return _undecodable(exc)
        return node(document, topic_id)

    return check


def _compile_text_payload(spec: TextPayloadSpec, scope: _Scope) -> _PayloadCheck:
    decode = build_encoder(spec, default_names=()).decode
    pieces: list[str] = []
    fragments: list[str] = []
    checks: list[_Check | None] = []
    for literal, name, format_spec, conversion in string.Formatter().parse(spec.template):
        if literal:
            pieces.append(re.escape(literal))
            fragments.append("")
        if name is None:
            continue
        rule = scope.rule(name)
        fragment = _text_fragment(rule, "python", format_spec or "", conversion)
        pieces.append(f"({fragment})")
        fragments.append(fragment)
        checks.append(scope.text_leaf(name, f".{name}", "python", format_spec or "", conversion))
    _drop_ambiguous(fragments, checks)
    pattern = re.compile("".join(pieces), re.DOTALL)
    located = [(index + 1, check) for index, check in enumerate(checks) if check is not None]
    template = spec.template

    def check(payload: bytes, topic_id: str | None) -> _Problem | None:
        try:
            text = decode(payload)
        except PayloadError as exc:
            return _undecodable(exc)
        match = pattern.fullmatch(text)
        if match is None:
            return _Problem(_SHAPE, "", f"{_show(text)} does not match {template!r}")
        for group, group_check in located:
            problem = group_check(match.group(group), topic_id)
            if problem is not None:
                return problem
        return None

    return check


def _compile_csv(
    spec: CSVPayloadSpec, default_names: Sequence[str], scope: _Scope
) -> _PayloadCheck:
    decode = build_encoder(spec, default_names=default_names).decode
    columns = list(spec.columns) if spec.columns is not None else list(default_names)
    checks = [scope.text_leaf(name, f".{name}", "render", "", None) for name in columns]
    count = len(columns)
    delimiter = spec.delimiter

    def check(payload: bytes, topic_id: str | None) -> _Problem | None:
        try:
            text = decode(payload)
        except PayloadError as exc:
            return _undecodable(exc)
        if '"' not in text and "\n" not in text and "\r" not in text:
            cells = text.split(delimiter)
        else:
            try:
                rows = list(
                    csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
                )
            except csv.Error as exc:
                return _Problem(_UNDECODABLE, "", f"not valid CSV: {exc}")
            if len(rows) != 1:
                return _Problem(_SHAPE, "", f"expected one line, got {len(rows)}")
            cells = rows[0]
        if len(cells) != count:
            return _Problem(_SHAPE, "", f"expected {count} columns, got {len(cells)}")
        for cell_check, cell in zip(checks, cells, strict=True):
            if cell_check is not None:
                problem = cell_check(cell, topic_id)
                if problem is not None:
                    return problem
        return None

    return check


def _compile_raw(spec: RawPayloadSpec) -> _PayloadCheck:
    data = spec.data()
    text = f"expected the constant {len(data)} bytes {data.hex(' ')}"

    def check(payload: bytes, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
        if payload == data:
            return None
        return _Problem(
            _SHAPE, "", f"{text}, got {len(payload)} bytes {bytes(payload[:16]).hex(' ')}"
        )

    return check


def _constant_physical(spec: BinaryNumberFieldSpec) -> float:
    """The value a constant number field decodes to (after its type's precision)."""
    raw = spec.constant_raw()
    if spec.type in FLOAT_TYPES:
        code = FLOAT_TYPES[spec.type][1]
        raw = struct.unpack(code, struct.pack(code, raw))[0]
    return raw if spec.linear_scale.is_identity else spec.linear_scale.to_physical(raw)


def _binary_field_checks(spec: BinaryPayloadSpec, scope: _Scope) -> list[tuple[str, _Check]]:
    """(field name, check of its decoded value) for the fields worth checking; lengths
    and CRCs are verified by decoding."""
    found: list[tuple[str, _Check]] = []
    for item in spec.fields:
        where = f".{item.name}"
        if isinstance(item, BinaryNumberFieldSpec):
            if item.value is not None:
                found.append((item.name, _constant_node(_constant_physical(item), where)))
                continue
            if item.type in FLOAT_TYPES:
                # The raw value keeps a relative precision; subnormal halves go down
                # to 2**-24 absolute.
                relative = _FLOAT_EPSILON[item.type]
                absolute = relative * abs(item.offset) + abs(item.scale) * 2.0**-24
            else:  # the raw value is rounded to an integer: half a step either way
                absolute, relative = abs(item.scale) / 2, 0.0
            source = item.value_source or item.name
            approximate = _compile_approximate(scope.rule(source), absolute, relative)
            if approximate is not None:
                found.append((item.name, _number_field_check(approximate, where)))
        elif isinstance(item, BinaryBitsFieldSpec):
            found.append((item.name, _bits_check(item, scope, where)))
        elif isinstance(item, BinaryStringFieldSpec):
            if item.value is not None:
                found.append((item.name, _constant_node(item.value, where)))
                continue
            source = item.value_source or item.name
            rule = scope.rule(source)
            if "str" in rule.kinds or rule.alternatives:
                found.append((item.name, scope.leaf(source, where)))
        elif isinstance(item, BinaryBytesFieldSpec) and item.hex is not None:
            found.append((item.name, _constant_node(bytes.fromhex(item.hex), where)))
    return found


def _number_field_check(approximate: _NumberCheck, path: str) -> _Check:
    def check(value: Any, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
        problem = approximate(value)
        if problem is None:
            return None
        return _Problem(problem.rank, path + problem.where, problem.text)

    return check


def _bits_check(spec: BinaryBitsFieldSpec, scope: _Scope, path: str) -> _Check:
    groups: list[tuple[str, _NumberCheck | None, int | None]] = []
    for bit in spec.bits:
        if bit.value is not None:
            groups.append((bit.name, None, bit.value))
        else:
            source = bit.value_source or bit.name
            groups.append((bit.name, _compile_approximate(scope.rule(source), 0.0), None))

    def check(value: Any, topic_id: str | None) -> _Problem | None:  # noqa: ARG001
        for name, approximate, constant in groups:
            bits = value[name]
            if constant is not None:
                if bits != constant:
                    return _Problem(_SHAPE, f"{path}.{name}", f"expected {constant}, got {bits}")
            elif approximate is not None:
                problem = approximate(bits)
                if problem is not None:
                    return _Problem(problem.rank, f"{path}.{name}", problem.text)
        return None

    return check


_FIELD_PATH: Final = re.compile(r"fields\[(\d+)\]")


def _compile_binary(spec: BinaryPayloadSpec, scope: _Scope) -> _PayloadCheck:
    encoder = BinaryPayloadEncoder(spec)
    decode = encoder.decode
    size = encoder.frame_size_bytes
    names = [item.name for item in spec.fields]
    checks = _binary_field_checks(spec, scope)

    def located(exc: PayloadError) -> _Problem:
        text = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
        match = _FIELD_PATH.match(exc.path)
        if match is None:
            return _Problem(_SHAPE, "", text)
        name = names[int(match.group(1))]
        return _Problem(_SHAPE, f".{name}", text.removeprefix(f"field {name!r}: "))

    def check(payload: bytes, topic_id: str | None) -> _Problem | None:
        if size is not None and len(payload) != size:
            return _Problem(_SHAPE, "", f"{len(payload)} bytes, but the layout is {size} bytes")
        try:
            values = decode(payload)
        except PayloadError as exc:
            return located(exc)
        for name, field_check in checks:
            problem = field_check(values[name], topic_id)
            if problem is not None:
                return problem
        return None

    return check


# ---------------------------------------------------------------------------------------
# Routing topics
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    """A message or event topic of one model and the check of its payloads."""

    pattern: re.Pattern[str]
    label: str
    check: _PayloadCheck
    captures_device_id: bool


@dataclass
class _Routes:
    """Every route of the models, and the topics they use for anything but device
    messages (commands, replies, will, birth)."""

    messages: list[_Route] = field(default_factory=list)
    skipped: list[re.Pattern[str]] = field(default_factory=list)


def _named(name: str) -> ValueRule:
    return _constant_rule(name, rank=_SHAPE)


_SEQ: Final = ValueRule(_INT, minimum=0)


def _message_context(rules: _ModelRules, name: str, message: MessageSpec) -> _Context:
    # The names the runtime sets per message, ahead of the device's (as it does).
    constants = {
        "seq": _SEQ,
        "message": _named(name),
        "event": _named(name),
        "severity": _constant_rule(""),
        "active": _constant_rule(True),  # noqa: FBT003 - a value, not a flag
    }
    states = frozenset(message.states) if message.states is not None else rules.all_states
    return _Context(constants, states)


def _event_context(rules: _ModelRules, name: str, event: EventSpec) -> _Context:
    constants: dict[str, ValueRule] = {
        "seq": _SEQ,
        "event": _named(name),
        "message": _named(name),
        "severity": _constant_rule(event.severity, rank=_SHAPE),
        "active": (
            ValueRule(_BOOL)
            if event.when is not None and event.send_clear
            else _constant_rule(True)  # noqa: FBT003 - a value, not a flag
        ),
    }
    if event.on_enter is not None:
        constants["state"] = _constant_rule(event.on_enter)
    return _Context(constants, rules.all_states)


def _model_routes(loaded: LoadedModel, prefix: str, routes: _Routes) -> None:
    """Add the routes of one model (its messages, events and skipped topics)."""
    spec = loaded.spec
    rules = _ModelRules(spec, loaded.base_dir)

    def topic(template: str, extra: Mapping[str, ValueRule]) -> tuple[re.Pattern[str], bool]:
        def lookup(name: str) -> ValueRule:
            return extra[name] if name in extra else rules.static_rule(name)

        source = rules.template_regex(template, lookup, capture_device_id=True)
        return re.compile(source, re.DOTALL), "(?P<device_id>" in source

    all_fields = tuple(spec.fields)
    for name, message in spec.messages.items():
        context = _message_context(rules, name, message)
        fields = tuple(message.fields) if message.fields is not None else all_fields
        check = _compile_payload(
            message.payload, (*_MESSAGE_DEFAULT_NAMES, *fields), _Scope(rules, context)
        )
        names = {"message": _named(name), "event": _named(name)}
        pattern, captures = topic(message.topic or DEFAULT_TOPIC, names)
        routes.messages.append(_Route(pattern, prefix + name, check, captures))
    for name, event in spec.events.items():
        context = _event_context(rules, name, event)
        payload = event.payload or JSONPayloadSpec(kind="json")
        check = _compile_payload(
            payload, (*_EVENT_DEFAULT_NAMES, *(event.fields or ())), _Scope(rules, context)
        )
        names = {"message": _named(name), "event": _named(name)}
        pattern, captures = topic(event.topic or DEFAULT_EVENT_TOPIC, names)
        routes.messages.append(_Route(pattern, prefix + name, check, captures))
    skipped: list[tuple[str, Mapping[str, ValueRule]]] = []
    if spec.commands is not None:
        any_command = {"command": ANY}
        skipped += [(spec.commands.topic, any_command), (spec.commands.reply_topic, any_command)]
        skipped += [
            (handler.reply.topic, {"command": _constant_rule(name)})
            for name, handler in spec.commands.handlers.items()
            if handler.reply is not None and handler.reply.topic is not None
        ]
    if spec.connection is not None:
        skipped += [
            (message.topic, {})
            for message in (spec.connection.will, spec.connection.birth)
            if message is not None
        ]
    for template, extra in skipped:
        routes.skipped.append(topic(template, extra)[0])


class Conformance:
    """Says whether a received (topic, payload) is a message the models could have sent.

    Build it once (:meth:`for_model` or :meth:`from_models`) and call it per message:
    ``conformance(topic, payload)`` is None when the message conforms, else a short
    problem text such as ``"telemetry.temperature: 41.2 above max 40"``. With several
    models the text starts with the fleet's name. Calling it is pure and cheap: regexes
    and per-message checks are compiled here, once.
    """

    __slots__ = ("_messages", "_no_route", "_skipped")

    def __init__(self, routes: _Routes, no_route: str) -> None:
        self._messages = tuple(routes.messages)
        self._skipped = tuple(routes.skipped)
        self._no_route = no_route

    @classmethod
    def for_model(cls, loaded: LoadedModel) -> Conformance:
        """The conformance of one model's messages."""
        routes = _Routes()
        _model_routes(loaded, "", routes)
        return cls(routes, f"no message of model {loaded.spec.name!r} has topic ")

    @classmethod
    def from_models(cls, models: Iterable[tuple[str, LoadedModel]]) -> Conformance:
        """The conformance of the messages of several fleets, each ``(name, model)``; a
        topic is routed to the models whose templates match it."""
        listed = list(models)
        if not listed:
            raise ValueError("from_models needs at least one (fleet name, model) pair")
        routes = _Routes()
        for fleet, loaded in listed:
            # One fleet needs no name in the problems; several do.
            _model_routes(loaded, f"{fleet}: " if len(listed) > 1 else "", routes)
        return cls(routes, "no message of any model has topic ")

    def __call__(self, topic: str, payload: bytes) -> str | None:
        """None if the message conforms, else what is wrong with it."""
        best: _Problem | None = None
        best_label = ""
        for route in self._messages:
            match = route.pattern.fullmatch(topic)
            if match is None:
                continue
            topic_id = match.group("device_id") if route.captures_device_id else None
            problem = route.check(payload, topic_id)
            if problem is None:
                return None
            if best is None or problem.rank < best.rank:
                best, best_label = problem, route.label
        for pattern in self._skipped:
            if pattern.fullmatch(topic) is not None:
                return None  # a command, a reply, a will or a birth: not a device message
        if best is None:
            return f"{self._no_route}{topic!r}"
        return f"{best_label}{best.where}: {best.text}"

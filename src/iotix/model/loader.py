"""Loading device models from YAML or JSON files, with errors that point at lines.

The file is parsed twice over one node tree: once into plain data for pydantic, and once
into a map from each value's path to its line, so that every problem pydantic or the
semantic check finds can be shown as ``file:line: fields.temperature.max: problem``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from iotix.errors import ModelError, ModelIssue
from iotix.model.check import check_model
from iotix.model.spec import DeviceModelSpec

PathKey = tuple[str | int, ...]
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and where it came from (replay files are relative to it)."""

    spec: DeviceModelSpec
    path: Path | None

    @property
    def base_dir(self) -> Path | None:
        return None if self.path is None else self.path.parent


class _LineMap:
    """Lines of the values in a YAML/JSON document, by path."""

    def __init__(self) -> None:
        self.lines: dict[PathKey, int] = {}
        self.duplicates: list[tuple[PathKey, int]] = []

    def line_for(self, path: PathKey) -> int | None:
        # The deepest known ancestor: a missing key is reported at its parent's line.
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def _map_lines(node: yaml.Node, path: PathKey, lines: _LineMap, loader: yaml.SafeLoader) -> None:
    lines.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                lines.duplicates.append(((*path, key), key_node.start_mark.line + 1))
            seen.add(key)
            _map_lines(value_node, (*path, key), lines, loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _map_lines(item, (*path, i), lines, loader)


def parse_document(text: str, file: Path | None) -> tuple[Any, _LineMap]:
    """Plain data and its line map; a syntax error becomes a ModelError."""
    lines = _LineMap()
    is_json = file is not None and file.suffix == ".json"
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(
                [ModelIssue((), f"invalid JSON: {exc.msg}", file=file, line=exc.lineno)]
            ) from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        constructed = None if node is None else loader.construct_document(node)
        if node is not None:
            _map_lines(node, (), lines, loader)
    except yaml.YAMLError as exc:
        if is_json:  # JSON that YAML cannot read (tabs, say): lose the lines, not the data
            return data, lines
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ModelError(
            [
                ModelIssue(
                    (),
                    f"invalid YAML: {problem}",
                    file=file,
                    line=None if mark is None else mark.line + 1,
                )
            ]
        ) from exc
    finally:
        loader.dispose()
    return (data if is_json else constructed), lines


def _issue_from_pydantic(error: Any, data: Any, lines: _LineMap, file: Path | None) -> ModelIssue:
    path: list[str | int] = []
    current = data
    tagged: Any = None  # the mapping whose union tag was skipped
    for part in error["loc"]:
        # Discriminated unions add the tag (`random_walk`) and validators add their own
        # names to `loc`; keep only the parts that exist in the document. A tag comes
        # right after the mapping whose `kind` it is, even if a (misspelt) key has the
        # same name, as in `{kind: interval, interval: 10}`.
        if isinstance(current, dict) and current.get("kind") == part and current is not tagged:
            tagged = current
            continue
        if (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        ):
            current = current[part]
            path.append(part)
    kind = error["type"]
    problem = str(error["msg"])
    hint = None
    if kind == "extra_forbidden":
        problem = f"unknown field {path[-1]!r}" if path else "unknown field"
        hint = "check the spelling; `iotix schema` lists every field"
    elif kind == "missing":
        name = error["loc"][-1]
        problem = f"missing required field {name!r}"
        path.append(name)
    elif kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        tag = ctx.get("tag")
        expected = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        problem = f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {tag!r}"
        close = difflib.get_close_matches(str(tag), expected, n=1)
        hint = (
            (f"did you mean {close[0]!r}? " if close else "")
            + "expected one of: "
            + ", ".join(expected)
        )
    elif kind == "union_tag_not_found":
        problem = "missing 'kind'"
        hint = "every generator, distribution, schedule and payload names its kind"
    elif problem.startswith("Value error, "):
        problem = problem.removeprefix("Value error, ")
    key = tuple(path)
    return ModelIssue(key, problem, file=file, line=lines.line_for(key), hint=hint)


def _dedupe(issues: list[ModelIssue]) -> list[ModelIssue]:
    """Unions report one error per alternative: keep one per path and problem. An unknown
    key beside a missing one is most likely its misspelling, so say so."""
    seen: dict[tuple[PathKey, str], ModelIssue] = {}
    for issue in issues:
        seen.setdefault((issue.path, issue.problem), issue)
    missing: dict[PathKey, list[str]] = {}
    for issue in seen.values():
        if issue.problem.startswith("missing required field") and issue.path:
            missing.setdefault(issue.path[:-1], []).append(str(issue.path[-1]))
    result = []
    explained: set[PathKey] = set()
    for issue in seen.values():
        siblings = missing.get(issue.path[:-1], []) if issue.path else []
        if issue.problem.startswith("unknown field") and siblings:
            close = difflib.get_close_matches(str(issue.path[-1]), siblings, n=1, cutoff=0.0)
            result.append(replace(issue, hint=f"did you mean {close[0]!r}?"))
            siblings.remove(close[0])  # one mistake, one error: the missing key is explained
            explained.add((*issue.path[:-1], close[0]))
        else:
            result.append(issue)
    return [i for i in result if not (i.path in explained and i.problem.startswith("missing"))]


def load_model_data(data: Any, *, file: Path | None = None, lines: Any = None) -> LoadedModel:
    """Validate already-parsed model data (from YAML, JSON or an API request)."""
    line_map = lines if isinstance(lines, _LineMap) else _LineMap()
    issues = [
        ModelIssue(path, "duplicate key (the later value would win)", file=file, line=line)
        for path, line in line_map.duplicates
    ]
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        issues.append(
            ModelIssue((), f"a device model is a mapping, but this is {kind}", file=file, line=1)
        )
        raise ModelError(issues)
    try:
        spec = DeviceModelSpec.model_validate(data)
    except ValidationError as exc:
        issues += [_issue_from_pydantic(e, data, line_map, file) for e in exc.errors()]
        raise ModelError(_dedupe(issues)) from exc
    base_dir = None if file is None else file.parent
    for path, problem, hint in check_model(spec, base_dir=base_dir):
        issues.append(ModelIssue(path, problem, file=file, line=line_map.line_for(path), hint=hint))
    if issues:
        raise ModelError(issues)
    return LoadedModel(spec, file)


def read_document(file: Path, *, what: str = "models") -> tuple[Any, _LineMap]:
    """A YAML or JSON file as plain data and its line map; a file that is missing,
    unreadable, of another type or not valid YAML/JSON is a ModelError (``what`` names
    the kind of file in the hint)."""
    if file.suffix not in SUFFIXES:
        raise ModelError(
            [
                ModelIssue(
                    (),
                    f"unsupported file type {file.suffix or '(none)'!r}",
                    file=file,
                    hint=f"{what} are .yaml, .yml or .json files",
                )
            ]
        )
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError([ModelIssue((), "no such file", file=file)]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError([ModelIssue((), f"cannot read the file: {exc}", file=file)]) from exc
    return parse_document(text, file)


def load_model(path: Path | str) -> LoadedModel:
    """Load and validate one model file (YAML or JSON)."""
    file = Path(path)
    data, lines = read_document(file)
    return load_model_data(data, file=file, lines=lines)

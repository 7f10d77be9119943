"""Bad models: every problem is reported with the file, the line, the field path and a hint."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import pytest

from iotix.errors import ModelError, ModelIssue
from iotix.model.loader import load_model

if TYPE_CHECKING:
    from pathlib import Path

VALID = """\
name: probe
fields:
  temperature: {kind: random_walk, start: 20, step: 0.1, min: -10, max: 50}
  setpoint: {kind: constant, value: 21}
messages:
  telemetry:
    schedule: {kind: interval, interval_s: 10}
"""


def issues_of(tmp_path: Path, text: str, name: str = "model.yaml") -> list[ModelIssue]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        load_model(path)
    return caught.value.issues


def only_issue(tmp_path: Path, text: str, name: str = "model.yaml") -> ModelIssue:
    issues = issues_of(tmp_path, text, name)
    assert len(issues) == 1, issues
    return issues[0]


def test_the_valid_baseline_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(VALID, encoding="utf-8")
    assert load_model(path).spec.name == "probe"


def test_misspelt_field_is_one_error_with_its_path_line_and_likely_intent(tmp_path: Path) -> None:
    issues = issues_of(
        tmp_path, VALID.replace("{kind: interval, interval_s: 10}", "{kind: interval, every: 10}")
    )
    assert len(issues) == 1  # the missing interval_s is the same mistake
    unknown = issues[0]
    assert unknown.dotted_path == "messages.telemetry.schedule.every"
    assert unknown.problem == "unknown field 'every'"
    assert unknown.hint == "did you mean 'interval_s'?"
    assert unknown.line == 7
    assert unknown.file == tmp_path / "model.yaml"


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "colour: blue\n")
    assert issue.dotted_path == "colour"
    assert "unknown field" in issue.problem
    assert issue.line == 8


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, VALID.replace("step: 0.1", "step: fast"))
    assert {i.dotted_path for i in issues} == {"fields.temperature.step"}
    assert all(i.line == 3 for i in issues)


def test_unknown_generator_kind_suggests_the_right_one(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID.replace("kind: random_walk", "kind: random-walk"))
    assert issue.dotted_path == "fields.temperature"
    assert "random-walk" in issue.problem
    assert issue.hint is not None
    assert "random_walk" in issue.hint


def test_missing_kind_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID.replace("{kind: constant, value: 21}", "{value: 21}"))
    assert issue.dotted_path == "fields.setpoint"
    assert "kind" in issue.problem


def test_missing_required_section_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, "name: probe\nfields: {}\n")
    assert issue.dotted_path == "messages"
    assert "missing" in issue.problem


def test_circular_derivation_is_reported_with_the_cycle(tmp_path: Path) -> None:
    text = VALID.replace(
        "  setpoint: {kind: constant, value: 21}\n",
        "  a: {kind: expression, expr: 'b + 1'}\n  b: {kind: expression, expr: 'a * 2'}\n",
    )
    issue = only_issue(tmp_path, text)
    assert "circular" in issue.problem
    assert "a -> b -> a" in issue.problem


def test_expression_naming_a_missing_field_suggests_a_close_one(tmp_path: Path) -> None:
    text = VALID.replace(
        "  setpoint: {kind: constant, value: 21}\n",
        "  f: {kind: expression, expr: 'temprature * 9 / 5 + 32'}\n",
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.f.expr"
    assert "temprature" in issue.problem
    assert "temperature" in issue.problem
    assert issue.line == 4


@pytest.mark.parametrize(
    ("expr", "word"),
    [
        ("temperature.__class__", "__class__"),
        ("__import__('os')", "__import__"),
        ("open('/etc/passwd')", "open"),
        ("(lambda: 1)()", "lambda"),
        ("[x for x in range(3)]", "comprehension"),
    ],
)
def test_unsafe_expression_is_refused(tmp_path: Path, expr: str, word: str) -> None:
    text = VALID.replace(
        "  setpoint: {kind: constant, value: 21}\n",
        f'  f: {{kind: expression, expr: "{expr}"}}\n',
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.f.expr"
    assert word in issue.problem.lower()


def test_message_naming_a_missing_field_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "    fields: [temperature, humidity]\n")
    assert issue.dotted_path == "messages.telemetry.fields[1]"
    assert "humidity" in issue.problem


def test_payload_reading_a_missing_name_is_reported(tmp_path: Path) -> None:
    text = VALID + "    payload: {kind: json, template: {t: '${temprature}'}}\n"
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path.startswith("messages.telemetry.payload")
    assert "temprature" in issue.problem
    assert issue.hint == "did you mean 'temperature'?"


def test_binary_field_too_small_for_its_values_is_reported(tmp_path: Path) -> None:
    text = VALID + textwrap.indent(
        textwrap.dedent(
            """\
            payload:
              kind: binary
              fields:
                - {name: temperature, type: i8, scale: 0.1}
            """
        ),
        "    ",
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "messages.telemetry.payload.fields[0]"
    assert "[-10, 50]" in issue.problem
    assert "i8" in issue.problem


def test_binary_constant_overflowing_its_type_is_reported(tmp_path: Path) -> None:
    text = VALID + textwrap.indent(
        textwrap.dedent(
            """\
            payload:
              kind: binary
              fields:
                - {name: header, type: u8, value: 300}
            """
        ),
        "    ",
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path.startswith("messages.telemetry.payload.fields")
    assert "300" in issue.problem


def test_missing_replay_file_is_reported(tmp_path: Path) -> None:
    text = VALID.replace(
        "{kind: constant, value: 21}", "{kind: replay, file: nowhere.csv, column: t}"
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.setpoint.file"
    assert "nowhere.csv" in issue.problem


def test_replay_file_with_a_ragged_row_is_reported_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("t,v\n0,1\n1,2,3\n", encoding="utf-8")
    text = VALID.replace("{kind: constant, value: 21}", "{kind: replay, file: data.csv, column: v}")
    issue = only_issue(tmp_path, text)
    assert "data.csv:3" in issue.problem
    assert "3 values" in issue.problem


def test_replay_of_a_missing_column_lists_the_columns(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("t,v\n0,1\n", encoding="utf-8")
    text = VALID.replace("{kind: constant, value: 21}", "{kind: replay, file: data.csv, column: w}")
    issue = only_issue(tmp_path, text)
    assert "'w'" in issue.problem
    assert "t, v" in issue.problem


def test_duplicate_keys_are_reported(tmp_path: Path) -> None:
    text = VALID.replace(
        "  setpoint: {kind: constant, value: 21}\n",
        "  setpoint: {kind: constant, value: 21}\n  setpoint: {kind: constant, value: 22}\n",
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.setpoint"
    assert "duplicate" in issue.problem
    assert issue.line == 5


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID.replace("step: 0.1,", "step: [0.1,"))
    assert "invalid YAML" in issue.problem
    assert issue.line is not None


def test_invalid_json_reports_the_line(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, '{\n  "name": "probe",\n  "fields": {,}\n}\n', "model.json")
    assert "invalid JSON" in issue.problem
    assert issue.line == 3


def test_json_models_report_lines_too(tmp_path: Path) -> None:
    text = '{\n  "name": "probe",\n  "messages": {},\n  "colour": 1\n}\n'
    issues = issues_of(tmp_path, text, "model.json")
    colour = next(i for i in issues if i.dotted_path == "colour")
    assert colour.line == 4


def test_empty_file_is_reported(tmp_path: Path) -> None:
    assert "empty" in only_issue(tmp_path, "").problem


def test_a_list_is_not_a_model(tmp_path: Path) -> None:
    assert "mapping" in only_issue(tmp_path, "- 1\n- 2\n").problem


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "absent.yaml")


def test_unsupported_suffix_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text(VALID, encoding="utf-8")
    with pytest.raises(ModelError, match="unsupported file type"):
        load_model(tmp_path / "model.txt")


def test_unknown_state_in_a_transition_is_reported(tmp_path: Path) -> None:
    text = VALID + textwrap.dedent(
        """\
        states:
          initial: idle
          states: {idle: {}, busy: {}}
          transitions:
            - {from: idle, to: bussy, after_s: 5}
        """
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "states.transitions[0].to"
    assert issue.hint == "did you mean 'busy'?"


def test_transition_with_two_triggers_is_reported(tmp_path: Path) -> None:
    text = VALID + textwrap.dedent(
        """\
        states:
          initial: idle
          states: {idle: {}}
          transitions:
            - {from: idle, to: idle, after_s: 5, when: "temperature > 1"}
        """
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "states.transitions[0]"
    assert "exactly one trigger" in issue.problem


def test_command_setting_a_generated_field_is_reported(tmp_path: Path) -> None:
    text = VALID.replace("{kind: constant, value: 21}", "{kind: wave, period_s: 60}") + (
        textwrap.dedent(
            """\
            commands:
              handlers:
                tune: {set: {setpoint: payload.value}}
            """
        )
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "commands.handlers.tune.set.setpoint"
    assert "cannot set" in issue.problem


def test_topic_with_a_per_sample_name_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "    topic: 'sites/{temperature}/x'\n")
    assert issue.dotted_path == "messages.telemetry.topic"
    assert "{temperature}" in issue.problem


def test_event_needs_exactly_one_trigger(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "events:\n  alarm: {severity: major}\n")
    assert issue.dotted_path == "events.alarm"
    assert "exactly one trigger" in issue.problem


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = VALID + "    fields: [nope]\n    topic: '{nothing}'\n"
    assert len(issues_of(tmp_path, text)) == 2


def test_issue_text_shows_file_line_path_problem_and_hint(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID.replace("kind: random_walk", "kind: random-walk"))
    text = str(issue)
    assert text.startswith(f"{tmp_path / 'model.yaml'}:3: fields.temperature: ")
    assert "(hint: did you mean 'random_walk'?" in text


def test_seq_is_a_message_name_not_a_field_input(tmp_path: Path) -> None:
    text = VALID.replace(
        "  setpoint: {kind: constant, value: 21}\n",
        "  f: {kind: expression, expr: 'seq * 2'}\n",
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.f.expr"
    assert "seq" in issue.problem


def test_gaussian_field_with_min_above_max_is_reported(tmp_path: Path) -> None:
    text = VALID.replace(
        "{kind: constant, value: 21}", "{kind: gaussian, mean: 21, stddev: 1, min: 30, max: 10}"
    )
    issue = only_issue(tmp_path, text)
    assert issue.dotted_path == "fields.setpoint"
    assert "must not be below" in issue.problem


# --- protocols ------------------------------------------------------------------------


def test_unknown_protocol_names_its_path_line_and_the_known_families(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "protocols: [mqtt, htp]\n")
    assert issue.file == tmp_path / "model.yaml"
    assert (issue.dotted_path, issue.line) == ("protocols[1]", 8)
    assert issue.problem == "unknown protocol 'htp'"
    assert issue.hint is not None
    assert issue.hint.startswith("did you mean 'http'? known protocols: mqtt, http, coap, kafka")
    assert "model.yaml:8: protocols[1]: unknown protocol 'htp'" in str(issue)


def test_a_protocol_listed_twice_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "protocols: [mqtt, coap, mqtt]\n")
    assert issue.dotted_path == "protocols[2]"
    assert issue.problem == "'mqtt' is listed twice (also protocols[0])"


def test_a_scheme_written_for_its_family_is_reported(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, VALID + "protocols: [mqtts]\n")
    assert issue.dotted_path == "protocols[0]"
    assert issue.problem == "'mqtts' is a scheme of the 'mqtt' family"
    assert issue.hint == "write 'mqtt'"


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ("[]", "protocols", "at least 1 item"),
        ("mqtt", "protocols", "valid list"),
        ("[mqtt, 7]", "protocols[1]", "valid string"),
    ],
)
def test_protocols_is_a_non_empty_list_of_names(
    tmp_path: Path, value: str, path: str, words: str
) -> None:
    issue = only_issue(tmp_path, VALID + f"protocols: {value}\n")
    assert issue.dotted_path == path
    assert words in issue.problem

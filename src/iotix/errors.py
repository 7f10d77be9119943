"""The iotix error tree.

Every error iotix raises on purpose derives from :class:`IotixError`; the CLI and the
services map these to exit codes and HTTP problems at the edge, and nothing in the core
raises anything else on bad input.

- :class:`IotixError`
    - :class:`ModelError` — a device model is invalid. Carries ``issues``: each one names
      the file, the line where it can be known, the field path, the problem and a hint.
        - ``ScenarioError`` (:mod:`iotix.scenario.loader`) — the same for a scenario file.
    - :class:`ExpressionError` — a derived expression does not parse, is unsafe, refers
      to a missing name, or fails while being evaluated. ``expression`` holds the source.
    - :class:`PayloadError` — a payload cannot be built or encoded (a value overflows its
      binary type, a template names a missing field). ``path`` names the payload field.
    - :class:`ReplayError` — a CSV replay file is missing or malformed. ``file`` and
      ``line`` say where.
    - :class:`ProtocolError` — a peer broke a wire protocol (a malformed or unexpected
      packet). ``reason_code`` is the code to close with, where the protocol has one.
        - :class:`MQTTProtocolError` — malformed MQTT, with the MQTT 5 reason code
          (0x81 malformed packet, 0x82 protocol error, 0x95 packet too large, ...).
            - ``UnexpectedAckError`` (:mod:`iotix.protocols.mqtt.session`) — an ack
              that does not fit what was sent (a PUBACK for a QoS 2 message, say).
        - ``WebSocketError`` (:mod:`iotix.protocols.websocket`) — a broken WebSocket
          frame or upgrade; ``reason_code`` is the close code.

Defined beside the code they belong to, and also IotixErrors: ``ProtocolNotDeclaredError``
(a model run over a protocol it does not declare, :mod:`iotix.model.protocols`),
``ProbeStartError`` (:mod:`iotix.engine.probe`), ``RunConfigError`` (run
settings, :mod:`iotix.engine.worker`), ``StagesError`` (:mod:`iotix.engine.stages`),
``CheckError`` (:mod:`iotix.scenario.checks`), ``TLSConfigError``
(:mod:`iotix.adapters.tls`), ``MQTTConnectError`` (:mod:`iotix.adapters.mqtt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class IotixError(Exception):
    """Base of every error iotix raises on purpose."""


@dataclass(frozen=True)
class ModelIssue:
    """One problem in a device model, located as precisely as the input allows."""

    path: tuple[str | int, ...]
    problem: str
    file: Path | None = None
    line: int | None = None
    hint: str | None = None

    @property
    def dotted_path(self) -> str:
        """The field path as `fields.temperature.max` or `payload.fields[2].type`."""
        text = ""
        for part in self.path:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "(top level)"

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else "<model>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: {self.dotted_path}: {self.problem}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


@dataclass
class ModelError(IotixError):
    """A device model is invalid; ``issues`` lists every problem found."""

    issues: list[ModelIssue] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues) or "invalid device model"


class ExpressionError(IotixError):
    """A derived expression is invalid, unsafe, or failed while being evaluated."""

    def __init__(self, message: str, *, expression: str) -> None:
        super().__init__(message)
        self.expression = expression


class PayloadError(IotixError):
    """A payload cannot be built or encoded."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ReplayError(IotixError):
    """A CSV replay file is missing or malformed."""

    def __init__(self, message: str, *, file: Path, line: int | None = None) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line


class ProtocolError(IotixError):
    """A peer broke a wire protocol: a malformed or unexpected packet."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MQTTProtocolError(ProtocolError):
    """Malformed or unexpected MQTT; ``reason_code`` is the MQTT 5 code to disconnect with
    (0x81 malformed packet by default)."""

    def __init__(self, message: str, *, reason_code: int = 0x81) -> None:
        super().__init__(message, reason_code=reason_code)

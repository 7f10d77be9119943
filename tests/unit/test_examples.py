"""Every example model validates, previews, and sends what its payload promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotix.model.loader import load_model
from iotix.model.runtime import MessageKind
from iotix.preview import preview_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
MODELS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def test_there_are_at_least_nine_examples() -> None:
    assert len(MODELS) >= 9


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_example_previews_and_every_payload_decodes(path: Path) -> None:
    loaded = load_model(path)
    preview = preview_model(loaded, devices=3, count=10, seed=1, start_epoch_s=1.767e9)
    assert not preview.horizon_reached
    sent = {m.name for m in preview.messages if m.kind is MessageKind.TELEMETRY}
    assert sent, "no telemetry in the preview"
    assert {m.device_id for m in preview.messages} == set(preview.batch.device_ids)
    for message in preview.messages:
        encoder = preview.batch.encoder_for(message)
        encoder.decode(message.payload)
        encoder.describe(message.payload)


def test_the_examples_declare_mqtt_and_only_protocols_that_carry_their_features() -> None:
    # Every example runs over MQTT (the demo runs four of them on an MQTT broker); a model
    # with a will or a birth declares MQTT alone, and one with commands no Kafka (Kafka
    # devices receive no commands). The thermostat declares nothing: it runs over any
    # protocol, and the protocol guides use it over each.
    for path in MODELS:
        spec = load_model(path).spec
        if spec.protocols is None:
            assert path.name == "thermostat.yaml", path.name
            continue
        assert "mqtt" in spec.protocols, path.name
        if spec.connection is not None:
            assert spec.protocols == ["mqtt"], path.name
        if spec.commands is not None:
            assert "kafka" not in spec.protocols, path.name

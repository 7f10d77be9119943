"""Every example model runs against a real Mosquitto: devices connect, send, account."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from iotix.clock import WallClock
from iotix.engine.worker import BrokerEndpoint, RunSettings, Worker
from iotix.model.loader import load_model

if TYPE_CHECKING:
    from iotix.metrics import Snapshot
    from iotix.testing import MosquittoBroker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device-models"
MODELS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".json"))
DEVICES = 5


def test_every_example_model_runs_against_mosquitto(mosquitto_session: MosquittoBroker) -> None:
    settings = RunSettings(
        devices=DEVICES,
        brokers=(BrokerEndpoint(mosquitto_session.host, mosquitto_session.port),),
        duration_s=4.0,
    )

    async def run_all() -> list[Snapshot]:
        # Each model in its own index range, so client ids never collide on the broker.
        workers = [
            Worker(load_model(path), range(n * 100, n * 100 + DEVICES), settings, WallClock())
            for n, path in enumerate(MODELS)
        ]
        return list(await asyncio.gather(*(w.run() for w in workers)))

    snapshots = asyncio.run(run_all())
    for path, snapshot in zip(MODELS, snapshots, strict=True):
        counters = snapshot.counters
        assert counters.connects == DEVICES, (path.name, counters.connect_failures_by_reason)
        assert counters.reconciles(), (path.name, counters.problems())
        assert set(counters.errors_by_kind) <= {"not sent: device not connected"}, path.name
    assert sum(s.counters.messages_sent for s in snapshots) > 0

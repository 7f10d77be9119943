"""Helpers shared by the broker tests: paho-mqtt wrapped as the independent client on
the other side of a broker (its own network thread, events to wait on, never sleeps),
a bounded wait for a condition the event loop's own work makes true, and a check that a
port is free again."""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import socket
import threading
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

if TYPE_CHECKING:
    from collections.abc import Callable

    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT_S = 10.0

_client_numbers = itertools.count()


class PahoClient:
    """A paho client on its own network thread, with events for what tests wait on."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        transport: Literal["tcp", "websockets"] = "tcp",
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"iotix-test-{os.getpid()}-{next(_client_numbers)}",
            protocol=protocol,
            transport=transport,
            # The test decides when to connect again (paho would retry after a second).
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.connack_reason: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.granted: list[ReasonCode] = []
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
    ) -> None:
        self.connack_reason = reason
        self.connack.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, _r: ReasonCode, _p: Properties | None
    ) -> None:
        self.disconnected.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _m: int, granted: list[ReasonCode], _p: Any
    ) -> None:
        self.granted = granted
        self.subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def subscribe(self, topic: str, qos: int) -> None:
        """Subscribe and wait for the SUBACK, which must grant the QoS asked for."""
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(TIMEOUT_S), "no SUBACK"
        assert [code.value for code in self.granted] == [qos]

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT_S)

    def close(self) -> None:
        """Stop the network thread and close every socket paho holds.

        ``loop_stop()`` leaves open the loopback TCP pair ``loop_start()`` made to wake
        its ``select()``: paho closes it only in ``Client.__del__``. This object and its
        client form a cycle (the callbacks are bound methods), so that waits for the
        cyclic GC, which may finalise the sockets before the client: a ResourceWarning
        in whichever later test the GC runs (eclipse-paho/paho.mqtt.python#627). paho
        has no public call for it, so this uses the one ``__del__`` uses.
        """
        stop_paho(self.client)


def stop_paho(client: mqtt.Client) -> None:
    """Stop a paho client's network thread and close the socket pair it wakes on (see
    :meth:`PahoClient.close`)."""
    client.loop_stop()
    client._reset_sockets()  # what paho's own __del__ calls


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait (bounded) for a condition that the loop's own work makes true: the state is
    looked at between iterations of the loop, and a timeout fails the test."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def port_is_free(host: str, port: int) -> bool:
    """Whether a new server could listen on the port (with SO_REUSEADDR, as brokers do)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True

"""iotix's MQTT client over TLS against a real Mosquitto TLS listener.

The certificates are made with openssl once per session: a CA, a server certificate
for 127.0.0.1 (an IP subjectAltName, which is what host name checking compares with
when connecting to an address) and one client certificate per device (dev-0, dev-1).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from iotix.adapters.mqtt import MQTTConnectError, open_connection
from iotix.adapters.tls import TLSContextCache, TLSSettings
from iotix.protocols.mqtt.session import SessionSettings
from iotix.testing import MosquittoBroker, TLSListenerSpec

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator
    from pathlib import Path

TIMEOUT_S = 10.0
DEVICES = ["dev-0", "dev-1"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ca.pem``, ``server.pem`` / ``server.key`` (127.0.0.1) and ``dev-N.crt`` /
    ``dev-N.key`` for each device, EC P-256, signed by the CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run scripts/services", pytrace=False)
    directory = tmp_path_factory.mktemp("mqtt-tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, capture_output=True, check=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=iotix TLS test CA")  # fmt: skip
    issued = [("server", "server", "subjectAltName=IP:127.0.0.1")]
    issued += [(device, device, "extendedKeyUsage=clientAuth") for device in DEVICES]
    for name, common_name, extension in issued:
        run("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={common_name}")  # fmt: skip
        (directory / f"{name}.ext").write_text(extension + "\n", encoding="utf-8")
        out = "server.pem" if name == "server" else f"{name}.crt"
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", out,
            "-extfile", f"{name}.ext")  # fmt: skip
    return directory


def listener(pki: Path, *, require_certificate: bool) -> TLSListenerSpec:
    return TLSListenerSpec(
        cafile=pki / "ca.pem",
        certfile=pki / "server.pem",
        keyfile=pki / "server.key",
        require_certificate=require_certificate,
    )


@pytest.fixture(scope="module")
def tls_broker(mosquitto_binary: Path, pki: Path) -> Iterator[MosquittoBroker]:
    """A TLS listener that does not ask clients for certificates."""
    tls = listener(pki, require_certificate=False)
    with MosquittoBroker(binary=mosquitto_binary, tls=tls) as broker:
        yield broker


@pytest.fixture(scope="module")
def mutual_tls_broker(mosquitto_binary: Path, pki: Path) -> Iterator[MosquittoBroker]:
    """A TLS listener that refuses clients without a certificate signed by the CA."""
    tls = listener(pki, require_certificate=True)
    with MosquittoBroker(binary=mosquitto_binary, tls=tls) as broker:
        yield broker


def per_device_settings(pki: Path) -> TLSSettings:
    return TLSSettings(
        ca_file=pki / "ca.pem",
        cert_file=str(pki / "{device_id}.crt"),
        key_file=str(pki / "{device_id}.key"),
    )


def publish_once(
    broker: MosquittoBroker,
    device_id: str,
    context: ssl.SSLContext,
    local_address: str | None = None,
) -> None:
    """Connect over TLS as ``device_id``, publish one QoS 1 message, wait for its PUBACK."""

    async def scenario() -> None:
        connection = await open_connection(
            broker.host,
            broker.tls_port,
            SessionSettings(client_id=device_id),
            ssl_context=context,
            local_address=local_address,
            timeout_s=TIMEOUT_S,
        )
        packet_id = connection.publish(f"iotix-test/tls/{device_id}", b"hello", qos=1)
        assert packet_id is not None
        await connection.wait_acked(packet_id)
        await connection.disconnect()

    asyncio.run(scenario())


def test_a_device_trusting_the_ca_file_publishes_over_tls(
    tls_broker: MosquittoBroker, pki: Path
) -> None:
    cache = TLSContextCache(TLSSettings(ca_file=pki / "ca.pem"))
    publish_once(tls_broker, "dev-0", cache.context_for("dev-0", 0))


def test_tls_from_a_source_address_still_verifies_the_broker_name(
    tls_broker: MosquittoBroker, pki: Path
) -> None:
    # With a source address the socket is connected first and handed to TLS, which
    # must still check the certificate against the host name.
    cache = TLSContextCache(TLSSettings(ca_file=pki / "ca.pem"))
    publish_once(tls_broker, "dev-src", cache.context_for("dev-src", 0), "127.0.0.9")
    assert "New connection from 127.0.0.9" in tls_broker.log_text()


def test_a_device_without_the_ca_fails_server_verification(tls_broker: MosquittoBroker) -> None:
    cache = TLSContextCache(TLSSettings())  # the system store does not know the test CA
    with pytest.raises(MQTTConnectError, match="certificate verif") as raised:
        publish_once(tls_broker, "dev-0", cache.context_for("dev-0", 0))
    assert raised.value.reason_code is None


def test_a_host_name_the_server_certificate_does_not_name_fails_verification(
    tls_broker: MosquittoBroker, pki: Path
) -> None:
    context = TLSContextCache(TLSSettings(ca_file=pki / "ca.pem")).context_for("dev-0", 0)

    async def connect() -> None:
        # The certificate names IP 127.0.0.1 only; "localhost" reaches the same socket.
        await open_connection(
            "localhost",
            tls_broker.tls_port,
            SessionSettings(client_id="dev-0"),
            ssl_context=context,
            timeout_s=TIMEOUT_S,
        )

    with pytest.raises(MQTTConnectError, match=r"(?i)hostname mismatch"):
        asyncio.run(connect())


def test_an_insecure_device_connects_without_the_ca(tls_broker: MosquittoBroker) -> None:
    cache = TLSContextCache(TLSSettings(insecure=True))
    publish_once(tls_broker, "dev-0", cache.context_for("dev-0", 0))


@pytest.mark.parametrize("index", range(len(DEVICES)))
def test_a_device_presenting_its_own_certificate_is_accepted(
    mutual_tls_broker: MosquittoBroker, pki: Path, index: int
) -> None:
    cache = TLSContextCache(per_device_settings(pki))
    device_id = DEVICES[index]
    publish_once(mutual_tls_broker, device_id, cache.context_for(device_id, index))


def test_devices_with_their_own_certificates_share_the_connection_loop(
    mutual_tls_broker: MosquittoBroker, pki: Path
) -> None:
    cache = TLSContextCache(per_device_settings(pki))

    async def scenario() -> None:
        connections = await asyncio.gather(
            *(
                open_connection(
                    mutual_tls_broker.host,
                    mutual_tls_broker.tls_port,
                    SessionSettings(client_id=device_id),
                    ssl_context=cache.context_for(device_id, index),
                    timeout_s=TIMEOUT_S,
                )
                for index, device_id in enumerate(DEVICES)
            )
        )
        ids = [c.publish("iotix-test/tls/both", b"x", qos=1) for c in connections]
        await asyncio.gather(
            *(c.wait_acked(i) for c, i in zip(connections, ids, strict=True) if i is not None)
        )
        await asyncio.gather(*(c.disconnect() for c in connections))

    asyncio.run(scenario())
    assert (len(cache), cache.contexts_built) == (2, 2)


def test_a_device_without_a_certificate_is_refused_by_a_broker_requiring_one(
    mutual_tls_broker: MosquittoBroker, pki: Path
) -> None:
    cache = TLSContextCache(TLSSettings(ca_file=pki / "ca.pem"))
    with pytest.raises(MQTTConnectError) as raised:
        publish_once(mutual_tls_broker, "dev-0", cache.context_for("dev-0", 0))
    # Refused in the handshake (TLS 1.3 reports it after the client's side is done), not
    # by a CONNACK, and not by running into the timeout.
    assert raised.value.reason_code is None
    assert "no CONNACK" not in str(raised.value)

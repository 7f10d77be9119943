"""TLSSettings validation and TLSContextCache: templates, file errors, sharing."""

from __future__ import annotations

import logging
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from iotix.adapters.tls import TLSConfigError, TLSContextCache, TLSSettings
from iotix.errors import IotixError

# -- certificates ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and client certificates for dev-0 to dev-2 (EC P-256), made with openssl:
    ``ca.pem``, ``dev-N.crt`` / ``dev-N.key``, ``combined.pem`` (dev-0's certificate and
    key in one file) and ``encrypted.key`` (dev-0's key under a passphrase)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run scripts/services", pytrace=False)
    directory = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, capture_output=True, check=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=iotix unit CA")  # fmt: skip
    for name in ["dev-0", "dev-1", "dev-2"]:
        run("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt")  # fmt: skip
    run("ec", "-in", "dev-0.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    (directory / "combined.pem").write_bytes(
        (directory / "dev-0.crt").read_bytes() + (directory / "dev-0.key").read_bytes()
    )
    (directory / "garbage.pem").write_text("not a PEM file\n", encoding="utf-8")
    return directory


def per_device(pki: Path) -> TLSSettings:
    return TLSSettings(
        ca_file=pki / "ca.pem",
        cert_file=str(pki / "{device_id}.crt"),
        key_file=str(pki / "{device_id}.key"),
    )


# -- templates ---------------------------------------------------------------------------


def test_templates_expand_device_id_and_index() -> None:
    settings = TLSSettings(cert_file="certs/{device_id}.crt", key_file="keys/{index:05d}.pem")
    assert settings.cert_path("dev-7", 7) == Path("certs/dev-7.crt")
    assert settings.key_path("dev-7", 7) == Path("keys/00007.pem")
    assert settings.per_device


def test_a_plain_path_is_the_same_for_every_device() -> None:
    settings = TLSSettings(cert_file="client.pem", key_file="client.key")
    assert settings.cert_path("dev-0", 0) == settings.cert_path("dev-1", 1) == Path("client.pem")
    assert not settings.per_device


def test_doubled_braces_are_literal() -> None:
    settings = TLSSettings(cert_file="{{certs}}/{device_id}.crt")
    assert settings.cert_path("d", 0) == Path("{certs}/d.crt")


def test_no_certificate_means_no_paths() -> None:
    settings = TLSSettings()
    assert settings.cert_path("d", 0) is None
    assert settings.key_path("d", 0) is None
    assert not settings.per_device


# -- validation of the settings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("certs/{serial}.crt", r"cert_file 'certs/\{serial\}.crt' uses \{serial\}"),
        ("certs/{}.crt", r"uses \{\}"),
        ("certs/{device_id.upper}.crt", r"uses \{device_id.upper\}"),
        ("certs/{device_id.crt", "not a valid template"),
        ("certs/{device_id:d}.crt", "cert_file 'certs/{device_id:d}.crt'"),
        ("", "cert_file is empty"),
    ],
)
def test_a_bad_cert_template_is_refused_naming_the_field(template: str, expected: str) -> None:
    with pytest.raises(TLSConfigError, match=expected) as raised:
        TLSSettings(cert_file=template)
    assert raised.value.field == "cert_file"


def test_an_unknown_placeholder_in_the_key_template_names_key_file() -> None:
    with pytest.raises(TLSConfigError, match=r"key_file 'k/\{name\}.key' uses \{name\}") as raised:
        TLSSettings(cert_file="c.crt", key_file="k/{name}.key")
    assert raised.value.field == "key_file"


def test_a_key_without_a_certificate_is_refused() -> None:
    with pytest.raises(
        TLSConfigError, match=re.escape("key_file 'client.key' is given without cert_file")
    ):
        TLSSettings(key_file="client.key")


def test_insecure_with_a_ca_file_is_refused() -> None:
    with pytest.raises(
        TLSConfigError, match=re.escape("ca_file ca.pem would be ignored")
    ) as raised:
        TLSSettings(ca_file=Path("ca.pem"), insecure=True)
    assert raised.value.field == "insecure"


def test_an_empty_server_hostname_is_refused() -> None:
    with pytest.raises(TLSConfigError, match="server_hostname is empty"):
        TLSSettings(server_hostname="")


def test_an_unknown_min_version_is_refused() -> None:
    with pytest.raises(TLSConfigError, match=re.escape("min_version 'TLSv1.1' is not one of")):
        TLSSettings(min_version="TLSv1.1")


def test_tls_config_error_is_an_iotix_error() -> None:
    assert issubclass(TLSConfigError, IotixError)


# -- files ---------------------------------------------------------------------------------


def test_a_missing_ca_file_is_named_when_the_cache_is_made(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        TLSConfigError, match=re.escape(f"ca_file {missing} does not exist")
    ) as raised:
        TLSContextCache(TLSSettings(ca_file=missing))
    assert raised.value.paths == (missing,)


def test_a_ca_file_that_is_not_pem_is_named(pki: Path) -> None:
    path = pki / "garbage.pem"
    with pytest.raises(TLSConfigError, match=re.escape(f"ca_file {path} cannot be loaded")):
        TLSContextCache(TLSSettings(ca_file=path))


def test_a_directory_as_ca_file_is_refused(pki: Path) -> None:
    with pytest.raises(TLSConfigError, match=re.escape(f"ca_file {pki} is a directory")):
        TLSContextCache(TLSSettings(ca_file=pki))


def test_a_missing_shared_certificate_is_named_when_the_cache_is_made(pki: Path) -> None:
    missing = pki / "client.crt"
    settings = TLSSettings(ca_file=pki / "ca.pem", cert_file=str(missing))
    with pytest.raises(TLSConfigError, match=re.escape(f"cert_file {missing} does not exist")):
        TLSContextCache(settings)


def test_a_missing_device_certificate_names_the_expanded_path(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki))
    missing = pki / "dev-9.crt"
    with pytest.raises(
        TLSConfigError, match=re.escape(f"cert_file {missing} does not exist")
    ) as raised:
        cache.context_for("dev-9", 9)
    assert (raised.value.field, raised.value.paths) == ("cert_file", (missing,))


def test_a_missing_device_key_names_the_expanded_path(pki: Path) -> None:
    settings = TLSSettings(
        ca_file=pki / "ca.pem",
        cert_file=str(pki / "dev-{index}.crt"),
        key_file=str(pki / "keys/dev-{index}.key"),
    )
    missing = pki / "keys/dev-0.key"
    with pytest.raises(TLSConfigError, match=re.escape(f"key_file {missing} does not exist")):
        TLSContextCache(settings).context_for("dev-0", 0)


def test_a_key_of_another_certificate_names_both_files(pki: Path) -> None:
    settings = TLSSettings(
        ca_file=pki / "ca.pem", cert_file=str(pki / "dev-0.crt"), key_file=str(pki / "dev-1.key")
    )
    with pytest.raises(TLSConfigError, match="does not belong to") as raised:
        TLSContextCache(settings)
    assert raised.value.paths == (pki / "dev-0.crt", pki / "dev-1.key")
    assert str(pki / "dev-0.crt") in str(raised.value)
    assert str(pki / "dev-1.key") in str(raised.value)


def test_a_certificate_that_is_not_pem_is_named(pki: Path) -> None:
    path = pki / "garbage.pem"
    settings = TLSSettings(cert_file=str(path), key_file=str(pki / "dev-0.key"), insecure=True)
    with pytest.raises(
        TLSConfigError, match=re.escape(f"cert_file {path} holds no PEM certificate")
    ):
        TLSContextCache(settings)


def test_a_key_that_is_not_pem_is_named(pki: Path) -> None:
    path = pki / "garbage.pem"
    settings = TLSSettings(cert_file=str(pki / "dev-0.crt"), key_file=str(path), insecure=True)
    with pytest.raises(
        TLSConfigError, match=re.escape(f"key_file {path} holds no PEM private key")
    ):
        TLSContextCache(settings)


def test_a_certificate_without_its_key_asks_for_key_file(pki: Path) -> None:
    path = pki / "dev-0.crt"
    with pytest.raises(
        TLSConfigError, match=re.escape(f"cert_file {path} holds no PEM private key")
    ):
        TLSContextCache(TLSSettings(cert_file=str(path), insecure=True))


def test_an_encrypted_key_is_refused_instead_of_prompting(pki: Path) -> None:
    path = pki / "encrypted.key"
    settings = TLSSettings(cert_file=str(pki / "dev-0.crt"), key_file=str(path), insecure=True)
    with pytest.raises(TLSConfigError, match=re.escape(f"key_file {path} is encrypted")):
        TLSContextCache(settings)


def test_a_certificate_file_holding_its_key_needs_no_key_file(pki: Path) -> None:
    settings = TLSSettings(ca_file=pki / "ca.pem", cert_file=str(pki / "combined.pem"))
    TLSContextCache(settings).context_for("dev-0", 0)


# -- sharing -------------------------------------------------------------------------------


def test_devices_without_their_own_certificate_share_one_context(pki: Path) -> None:
    cache = TLSContextCache(
        TLSSettings(ca_file=pki / "ca.pem", cert_file=str(pki / "combined.pem"))
    )
    contexts = {id(cache.context_for(f"dev-{i}", i)) for i in range(1000)}
    assert len(contexts) == 1
    assert (len(cache), cache.contexts_built) == (1, 1)


def test_the_same_device_certificate_gives_the_same_context(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki))
    assert cache.context_for("dev-0", 0) is cache.context_for("dev-0", 0)
    assert cache.contexts_built == 1


def test_different_device_certificates_give_different_contexts(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki))
    assert cache.context_for("dev-0", 0) is not cache.context_for("dev-1", 1)
    assert (len(cache), cache.contexts_built) == (2, 2)


def test_the_least_recently_used_context_is_evicted(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki), max_contexts=1)
    first = cache.context_for("dev-0", 0)
    cache.context_for("dev-1", 1)
    assert cache.context_for("dev-0", 0) is not first
    assert (len(cache), cache.contexts_built) == (1, 3)


def test_a_used_context_is_kept_over_an_older_one(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki), max_contexts=2)
    dev0 = cache.context_for("dev-0", 0)
    dev1 = cache.context_for("dev-1", 1)
    assert cache.context_for("dev-0", 0) is dev0  # dev-0 is now the most recent
    cache.context_for("dev-2", 2)  # evicts dev-1
    assert cache.context_for("dev-0", 0) is dev0
    assert cache.context_for("dev-1", 1) is not dev1


def test_a_device_whose_files_fail_caches_nothing(pki: Path) -> None:
    cache = TLSContextCache(per_device(pki), max_contexts=1)
    dev0 = cache.context_for("dev-0", 0)
    with pytest.raises(TLSConfigError):
        cache.context_for("dev-9", 9)
    assert cache.context_for("dev-0", 0) is dev0
    assert (len(cache), cache.contexts_built) == (1, 1)


def test_max_contexts_must_be_positive(pki: Path) -> None:
    with pytest.raises(TLSConfigError, match="max_contexts is 0"):
        TLSContextCache(per_device(pki), max_contexts=0)


# -- what the contexts do ------------------------------------------------------------------


def test_contexts_verify_the_server_and_its_host_name_by_default(pki: Path) -> None:
    context = TLSContextCache(per_device(pki)).context_for("dev-0", 0)
    assert context.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.cert_store_stats()["x509_ca"] == 1  # the CA file, not the system store


def test_insecure_disables_server_verification(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="iotix.adapters.tls"):
        context = TLSContextCache(TLSSettings(insecure=True)).context_for("dev-0", 0)
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert "verification is off" in caplog.text


def test_min_version_reaches_the_context(pki: Path) -> None:
    settings = TLSSettings(ca_file=pki / "ca.pem", min_version="TLSv1.3")
    context = TLSContextCache(settings).context_for("dev-0", 0)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3

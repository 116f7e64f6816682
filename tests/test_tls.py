"""TLS and mutual TLS (common/tls.py, docs/tls.md): real certificates, real processes.

The local PKI is made once per module; the gateway, the monitor and `flowline up` run
as real processes with it, and every client check is a real handshake.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.processes import free_port, free_port_block, option_args
from common.settings import SettingsError
from common.tls import (
    LocalPki,
    TlsSettings,
    _make_leaf,
    _new_key,
    _write_pem,
    client_ssl_context,
    client_tls,
    generate_local_pki,
    grpc_server_credentials,
    scheme,
    uvicorn_ssl_options,
)
from flowline import cli
from flowline.supervisor import healthy
from monitoring.capture.client import client_from_env
from serving.controller.gateway_client import GatewayClient, GatewayError
from serving.deployment import Deployment
from serving.gateway.capture import CapturedRequest
from tests.conftest import BIN, REPO, Service, spawn_service, subprocess_env, wait_for

ADMIN_TOKEN = "tls-test-admin-token"
INGEST_TOKEN = "tls-test-ingest-token"
START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """The local CA and the certificate it signed, as `flowline up --tls` makes them."""
    return generate_local_pki(tmp_path_factory.mktemp("pki") / "tls", ["flowline.test"])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """Another CA and its certificate: valid, but not the one the servers trust."""
    return generate_local_pki(tmp_path_factory.mktemp("stranger") / "tls", [])


@pytest.fixture(autouse=True)
def _system_trust_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # "No trust" must mean the system store: a CA bundle named by the environment
    # would otherwise decide what requests verifies against.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def tls_env(pki: LocalPki, mutual: bool) -> dict[str, str]:
    """The FLOWLINE_TLS_* variables of a role serving with ``pki``."""
    env = {
        "FLOWLINE_TLS_CERT": str(pki.cert),
        "FLOWLINE_TLS_KEY": str(pki.key),
        "FLOWLINE_TLS_CA": str(pki.ca_cert),
    }
    if mutual:
        env["FLOWLINE_TLS_CLIENT_CA"] = str(pki.ca_cert)
    return env


def start_https(module: str, workdir: Path, env: dict[str, str], health: str) -> Service:
    """`python -m <module>` on a free port, once ``health`` answers 200 over verified TLS."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file)]  # fmt: skip
    child = subprocess_env(FLOWLINE_HOME=str(workdir / "home"), **env)
    service = spawn_service(argv, workdir / "log", child, "")
    tls = TlsSettings.from_env(env)

    def ready() -> bool:
        if not service.alive():
            raise RuntimeError(f"{module} exited: {service.log_tail()}")
        if not port_file.is_file() or not port_file.read_text().strip():
            return False
        service.url = f"https://127.0.0.1:{port_file.read_text().strip()}"
        return healthy(service.url + health, tls, timeout=2.0)

    try:
        wait_for(ready, f"{module} to answer over TLS", START_TIMEOUT)
    except BaseException:
        service.stop()
        raise
    return service


@contextlib.contextmanager
def https_service(
    module: str, workdir: Path, env: dict[str, str], health: str
) -> Iterator[Service]:
    """`start_https`, stopped on the way out whatever happens."""
    service = start_https(module, workdir, env, health)
    try:
        yield service
    finally:
        service.stop()


def gateway_env(pki: LocalPki, mutual: bool) -> dict[str, str]:
    """A gateway's environment: TLS with ``pki`` and the admin API on."""
    return {**tls_env(pki, mutual), "FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def tls_gateway(pki: LocalPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real gateway serving HTTPS with the local certificate (no client certificates)."""
    workdir = tmp_path_factory.mktemp("gw-tls")
    with https_service("serving.gateway", workdir, gateway_env(pki, False), "/ping") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def mtls_gateway(pki: LocalPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real gateway under mutual TLS: clients need a certificate the local CA signed."""
    workdir = tmp_path_factory.mktemp("gw-mtls")
    with https_service("serving.gateway", workdir, gateway_env(pki, True), "/ping") as gateway:
        yield gateway


# --- settings --------------------------------------------------------------------------


def test_a_certificate_without_its_key_is_a_one_line_error(pki: LocalPki) -> None:
    with pytest.raises(SettingsError) as caught:
        TlsSettings.from_env({"FLOWLINE_TLS_CERT": str(pki.cert)})
    message = str(caught.value)
    assert "\n" not in message
    assert "FLOWLINE_TLS_CERT" in message and "FLOWLINE_TLS_KEY" in message
    with pytest.raises(SettingsError, match="FLOWLINE_TLS_KEY"):
        TlsSettings.from_env({"FLOWLINE_TLS_KEY": str(pki.key)})


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"FLOWLINE_TLS_CERT": "/no/such/cert.pem", "FLOWLINE_TLS_KEY": "{key}"}, "no such file"),
        ({"FLOWLINE_TLS_CERT": "{cert}", "FLOWLINE_TLS_KEY": "{ca_key}"}, "KEY_VALUES_MISMATCH"),
        ({"FLOWLINE_TLS_CA": "{key}"}, "FLOWLINE_TLS_CA: cannot load"),
        ({"FLOWLINE_TLS_CLIENT_CA": "{ca_cert}"}, "needs FLOWLINE_TLS_CERT"),
    ],
)
def test_bad_tls_settings_are_one_line_errors(
    pki: LocalPki, variables: dict[str, str], expected: str
) -> None:
    paths = {name: str(getattr(pki, name)) for name in ("cert", "key", "ca_key", "ca_cert")}
    environ = {name: value.format(**paths) for name, value in variables.items()}
    with pytest.raises(SettingsError, match=expected) as caught:
        TlsSettings.from_env(environ)
    assert "\n" not in str(caught.value)


def test_an_encrypted_key_is_refused_instead_of_prompting(pki: LocalPki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    environ = {"FLOWLINE_TLS_CERT": str(pki.cert), "FLOWLINE_TLS_KEY": str(encrypted)}
    with pytest.raises(SettingsError, match="the key is encrypted"):
        TlsSettings.from_env(environ)


def test_tls_is_off_without_variables() -> None:
    settings = TlsSettings.from_env({})
    assert not settings.enabled and not settings.mutual
    assert uvicorn_ssl_options(settings) == {}
    assert client_tls(settings) == (True, None)
    assert scheme(settings) == "http"
    assert grpc_server_credentials(settings) is None


def test_mutual_tls_options_for_uvicorn_requests_and_grpc(pki: LocalPki) -> None:
    settings = TlsSettings.from_env(tls_env(pki, mutual=True))
    assert settings.enabled and settings.mutual and scheme(settings) == "https"
    assert uvicorn_ssl_options(settings) == {
        "ssl_certfile": str(pki.cert),
        "ssl_keyfile": str(pki.key),
        "ssl_ca_certs": str(pki.ca_cert),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }
    assert client_tls(settings) == (str(pki.ca_cert), (str(pki.cert), str(pki.key)))
    assert isinstance(grpc_server_credentials(settings), grpc.ServerCredentials)
    plain = TlsSettings.from_env(tls_env(pki, mutual=False))
    assert "ssl_cert_reqs" not in uvicorn_ssl_options(plain)


# --- the local PKI ---------------------------------------------------------------------


def test_local_pki_files_names_usage_and_chain(pki: LocalPki) -> None:
    assert stat.S_IMODE(pki.cert.parent.stat().st_mode) == 0o700
    for path in (pki.ca_cert, pki.ca_key, pki.cert, pki.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(pki.cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "flowline.test"}
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    # The chain verifies as a server (for each name) and as a client, per RFC 5280.
    store = verification.Store([ca])
    for name in (x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("localhost")):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(name)
        assert verifier.verify(leaf, []) == [leaf, ca]
    client = verification.PolicyBuilder().store(store).build_client_verifier()
    assert client.verify(leaf, []).chain == [leaf, ca]
    # And Python's ssl loads it all: the pair for a server, the CA for a client.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(pki.cert, pki.key)
    ssl.create_default_context(cafile=pki.ca_cert)


def test_local_pki_is_reused_and_remade_when_missing_or_expired(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = generate_local_pki(directory, [])
    contents = {path: path.read_bytes() for path in (first.ca_cert, first.ca_key, first.cert)}
    again = generate_local_pki(directory, [])
    assert again == first
    assert {path: path.read_bytes() for path in contents} == contents  # nothing rewritten

    first.cert.unlink()
    generate_local_pki(directory, [])
    assert first.cert.read_bytes() != contents[first.cert]
    assert first.ca_cert.read_bytes() == contents[first.ca_cert]  # the CA users trust stays

    # An expired certificate (signed by the same CA) is made again.
    ca_cert = x509.load_pem_x509_certificate(first.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(first.ca_key.read_bytes(), None)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2000)
    expired = _make_leaf(_new_key(), (ca_cert, ca_key), ["localhost"], past)  # type: ignore[arg-type]
    _write_pem(first.cert, expired.public_bytes(serialization.Encoding.PEM))
    generate_local_pki(directory, [])
    renewed = x509.load_pem_x509_certificate(first.cert.read_bytes())
    assert renewed.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert first.ca_cert.read_bytes() == contents[first.ca_cert]

    # A new host name: a new certificate naming it, same CA.
    generate_local_pki(directory, ["10.9.8.7"])
    san = x509.load_pem_x509_certificate(first.cert.read_bytes()).extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.9.8.7" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


# --- a real gateway over TLS -----------------------------------------------------------


def test_https_with_the_ca_is_served_and_plain_http_is_refused(
    tls_gateway: Service, pki: LocalPki
) -> None:
    url = f"{tls_gateway.url}/ping"
    assert requests.get(url, verify=str(pki.ca_cert), timeout=5).status_code == 200
    assert httpx.get(url, verify=client_ssl_context(pki.settings()), timeout=5).status_code == 200
    # Plain HTTP on the TLS port: the handshake fails, no HTTP answer ever comes.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_gateway.port}/ping", timeout=5)
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=5) as raw:
        raw.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(100).startswith(b"HTTP/")
    assert requests.get(url, verify=str(pki.ca_cert), timeout=5).status_code == 200  # still up


def test_a_client_that_does_not_trust_the_ca_fails_verification(
    tls_gateway: Service, stranger: LocalPki
) -> None:
    url = f"{tls_gateway.url}/ping"
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(url, timeout=5)  # the system store
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(url, verify=str(stranger.ca_cert), timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, timeout=5)


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    mtls_gateway: Service, pki: LocalPki, stranger: LocalPki
) -> None:
    url = f"{mtls_gateway.url}/ping"
    with pytest.raises(requests.ConnectionError):  # no client certificate
        requests.get(url, verify=str(pki.ca_cert), timeout=5)
    with pytest.raises(requests.ConnectionError):  # one the CA did not sign
        requests.get(
            url, verify=str(pki.ca_cert), cert=(str(stranger.cert), str(stranger.key)), timeout=5
        )
    answer = requests.get(
        url, verify=str(pki.ca_cert), cert=(str(pki.cert), str(pki.key)), timeout=5
    )
    assert answer.status_code == 200


def test_the_v2_grpc_port_serves_tls_and_refuses_clients_without_a_certificate(
    pki: LocalPki, stranger: LocalPki, tmp_path: Path
) -> None:
    from serving.gateway.v2 import inference_pb2 as pb
    from serving.gateway.v2 import inference_pb2_grpc as pb_grpc

    grpc_port = free_port()
    env = {**gateway_env(pki, True), "FLOWLINE_GRPC_PORT": str(grpc_port)}
    address = f"127.0.0.1:{grpc_port}"
    ca = pki.ca_cert.read_bytes()

    def live(credentials: grpc.ChannelCredentials | None) -> bool:
        channel = (
            grpc.insecure_channel(address)
            if credentials is None
            else grpc.secure_channel(address, credentials)
        )
        with channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live

    with https_service("serving.gateway", tmp_path / "gw", env, "/ping"):
        trusted = grpc.ssl_channel_credentials(ca, pki.key.read_bytes(), pki.cert.read_bytes())
        assert live(trusted)
        for refused in (
            None,  # plain gRPC to the TLS port
            grpc.ssl_channel_credentials(ca),  # no client certificate
            grpc.ssl_channel_credentials(
                ca, stranger.key.read_bytes(), stranger.cert.read_bytes()
            ),  # one the CA did not sign
        ):
            with pytest.raises(grpc.RpcError) as failure:
                live(refused)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_controllers_gateway_client_works_under_mutual_tls(
    mtls_gateway: Service, pki: LocalPki, stranger: LocalPki
) -> None:
    verify, cert = client_tls(pki.settings(mutual=True))
    client = GatewayClient(mtls_gateway.url, ADMIN_TOKEN, timeout=5, verify=verify, cert=cert)
    deployment = Deployment("tls-model", "1", ("http://127.0.0.1:9",))
    client.put(deployment)
    assert client.routes()["tls-model"]["version"] == "1"
    client.delete("tls-model")
    assert "tls-model" not in client.routes()

    wrong_ca = GatewayClient(
        mtls_gateway.url, ADMIN_TOKEN, timeout=5, verify=str(stranger.ca_cert), cert=cert
    )
    with pytest.raises(GatewayError, match="SSLError"):
        wrong_ca.routes()
    no_certificate = GatewayClient(mtls_gateway.url, ADMIN_TOKEN, timeout=5, verify=verify)
    with pytest.raises(GatewayError, match="unreachable"):
        no_certificate.routes()


# --- the monitor and the capture client --------------------------------------------------


def test_capture_reaches_a_monitor_under_mutual_tls(pki: LocalPki, tmp_path: Path) -> None:
    env = {**tls_env(pki, mutual=True), "FLOWLINE_INGEST_TOKEN": INGEST_TOKEN,
           "FLOWLINE_MONITOR_MLFLOW": "0", "MLFLOW_TRACKING_URI": ""}  # fmt: skip
    with https_service("monitoring", tmp_path / "monitor", env, "/health") as monitor:
        body = b'{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}'
        base = {"FLOWLINE_MONITOR_URL": monitor.url, "FLOWLINE_INGEST_TOKEN": INGEST_TOKEN}
        trusted = client_from_env({**base, **tls_env(pki, mutual=True),
                                   "FLOWLINE_HOME": str(tmp_path / "gw")})  # fmt: skip
        assert trusted is not None
        try:
            trusted.submit("tls-model", "1", CapturedRequest(body, "application/json"), [0])
            assert trusted.flush(30), trusted.stats()
            assert trusted.stats()["delivered"] == 1
        finally:
            trusted.close(timeout=2)
        # Without FLOWLINE_TLS_*: no client certificate, system trust: nothing delivered.
        untrusted = client_from_env({**base, "FLOWLINE_HOME": str(tmp_path / "gw2")})
        assert untrusted is not None
        try:
            untrusted.submit("tls-model", "1", CapturedRequest(body, "application/json"), [0])
            wait_for(lambda: untrusted.stats()["delivery_failures"] > 0, "a refused delivery")
            assert untrusted.stats()["delivered"] == 0
        finally:
            untrusted.close(timeout=1)
        answer = requests.get(
            f"{monitor.url}/drift",
            verify=str(pki.ca_cert),
            cert=(str(pki.cert), str(pki.key)),
            timeout=5,
        )
        assert [m["model"] for m in answer.json()["models"]] == ["tls-model"]


def test_a_role_with_half_the_tls_settings_stops_in_one_line(pki: LocalPki, tmp_path: Path) -> None:
    env = subprocess_env(FLOWLINE_HOME=str(tmp_path), FLOWLINE_TLS_CERT=str(pki.cert))
    env.pop("FLOWLINE_TLS_KEY", None)
    # The three roles at once: each is a Python start-up of a second or two.
    roles = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ("serving.gateway", "monitoring", "serving.controller")
    }
    try:
        for module, role in roles.items():
            _, stderr = role.communicate(timeout=60)
            assert role.returncode == 2, (module, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in stderr, (module, stderr)
            assert "FLOWLINE_TLS_CERT and FLOWLINE_TLS_KEY go together" in lines[0], module
    finally:
        for role in roles.values():
            if role.poll() is None:
                role.kill()
                role.wait()


# --- `flowline up --mtls` ------------------------------------------------------------------


def test_flowline_up_mtls_serves_every_role_over_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    ports = {"--port": free_port(), "--workers": 1, "--gateway-port": free_port(),
             "--controller-port": free_port(), "--monitor-port": free_port(),
             "--replica-port-from": free_port_block(4)}  # fmt: skip
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [str(BIN / "flowline"), "up", "--mtls", *option_args(ports)],
            env=subprocess_env(FLOWLINE_HOME=str(home)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "press Ctrl-C" in log.read_text() or up.poll() is not None,
            "flowline up --mtls to be ready",
            START_TIMEOUT,
        )
        text = log.read_text()
        assert up.poll() is None, text
        pki = LocalPki.at(home / "tls")
        assert f"http://127.0.0.1:{ports['--port']}" in text  # the tracking server: HTTP
        for flag in ("--gateway-port", "--controller-port", "--monitor-port"):
            assert f"https://127.0.0.1:{ports[flag]}" in text
        assert f"curl --cacert {pki.ca_cert} --cert {pki.cert} --key {pki.key}" in text
        assert f"REQUESTS_CA_BUNDLE={pki.ca_cert}" in text

        verify, cert = client_tls(pki.settings(mutual=True))
        controller = f"https://127.0.0.1:{ports['--controller-port']}"
        answer = requests.get(f"{controller}/status", verify=verify, cert=cert, timeout=5)
        assert answer.status_code == 200 and answer.json()["errors"] == {}
        monitor = f"https://127.0.0.1:{ports['--monitor-port']}/health"
        assert requests.get(monitor, verify=verify, cert=cert, timeout=5).status_code == 200
        with pytest.raises(requests.ConnectionError):  # no client certificate
            requests.get(f"{controller}/status", verify=verify, timeout=5)
        # The controller reached the gateway over mutual TLS on its first pass.
        assert "gateway unreachable" not in (home / "logs" / "controller.log").read_text()

        # `flowline status --tls` finds the local CA and certificate in the home.
        monkeypatch.setenv("FLOWLINE_HOME", str(home))
        assert cli.main(["status", "--tls", *option_args(ports)]) == 0
        assert '"deployments": []' in capsys.readouterr().out
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
    assert up.returncode == 0, log.read_text()[-2000:]


def test_a_tls_server_with_an_idle_keep_alive_client_stops_at_once(
    pki: LocalPki, tmp_path: Path
) -> None:
    with https_service("serving.gateway", tmp_path, gateway_env(pki, True), "/ping") as gateway:
        verify, cert = client_tls(pki.settings(mutual=True))
        with requests.Session() as idle:  # keeps its connection open, never reads again
            assert idle.get(f"{gateway.url}/ping", verify=verify, cert=cert).status_code == 200
            # A TLS close waits for the peer's close_notify (30 s): idle ones are aborted.
            started = time.monotonic()
            gateway.stop(grace=10.0)
            assert time.monotonic() - started < 5.0
            # Ended by its SIGTERM (uvicorn re-raises it after a clean shutdown), no SIGKILL.
            assert gateway.process.popen.returncode == -signal.SIGTERM, gateway.log_tail()

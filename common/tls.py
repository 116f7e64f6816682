"""TLS and mutual TLS for flowline's own servers (gateway, monitor, controller) and clients.

Four variables, all optional (docs/tls.md):

- ``FLOWLINE_TLS_CERT`` and ``FLOWLINE_TLS_KEY``: the server's certificate (chain) and
  private key, PEM files. Both set: the process serves HTTPS only; neither: plain HTTP.
- ``FLOWLINE_TLS_CLIENT_CA``: a PEM bundle of CAs. Set: servers require a client
  certificate signed by one of them (mutual TLS) and refuse connections without one.
- ``FLOWLINE_TLS_CA``: the PEM bundle flowline's own clients (controller -> gateway,
  gateway -> monitor, health checks) verify servers against; unset: the system store.

When the certificate and key are set, flowline's clients also present them as their
client certificate, so one certificate with both serverAuth and clientAuth (what
:func:`generate_local_pki` makes) serves every role under mutual TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import AfterValidator, BeforeValidator, model_validator

from common.settings import FlowlineBaseSettings

if TYPE_CHECKING:  # grpc is imported only by the one function that builds its credentials
    import grpc

# Every certificate generate_local_pki makes names these: the roles bind loopback by default.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
# 825 days: the longest validity macOS and iOS accept for a TLS server certificate.
LEAF_DAYS = 825
# A certificate this close to its end is made again, so a long-running platform
# started today does not find it expired next week.
RENEW_BEFORE = datetime.timedelta(days=30)
CA_NAME = "flowline local CA"
# x509.KeyUsage's arguments, every one of which it requires.
KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
LEAF_NAME = "flowline"


def _none_if_empty(value: Any) -> Any:
    return value or None


def _existing_file(value: Path | None) -> Path | None:
    # Checked when the settings are read, so a typo stops the process before it binds
    # anything, in one line, instead of failing the first handshake.
    if value is None:
        return None
    value = value.expanduser().resolve()
    if not value.is_file():
        raise ValueError("no such file")
    return value


PemFile = Annotated[Path | None, BeforeValidator(_none_if_empty), AfterValidator(_existing_file)]
"""An existing PEM file ('~' expanded, made absolute); unset or empty is None."""


class TlsSettings(FlowlineBaseSettings):
    """FLOWLINE_TLS_CERT, _KEY, _CLIENT_CA and _CA (module docstring; docs/tls.md).

    The certificate and key go together, and a client CA needs them (only a TLS
    server can ask for client certificates). The files are loaded once here, so a
    key that does not match its certificate, or a file that is not PEM, is a
    one-line SettingsError when the settings are read.
    """

    tls_cert: PemFile = None
    tls_key: PemFile = None
    tls_client_ca: PemFile = None
    tls_ca: PemFile = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "FLOWLINE_TLS_CERT and FLOWLINE_TLS_KEY go together: set both or neither"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "FLOWLINE_TLS_CLIENT_CA (mutual TLS) needs FLOWLINE_TLS_CERT and FLOWLINE_TLS_KEY"
            )
        if self.tls_cert is not None and self.tls_key is not None:
            _loads(
                "FLOWLINE_TLS_CERT/FLOWLINE_TLS_KEY",
                lambda c: c.load_cert_chain(self.tls_cert, self.tls_key, _no_password),
            )
        for name, bundle in (
            ("FLOWLINE_TLS_CLIENT_CA", self.tls_client_ca),
            ("FLOWLINE_TLS_CA", self.tls_ca),
        ):
            if bundle is not None:
                _loads(name, lambda c, bundle=bundle: c.load_verify_locations(cafile=bundle))
        return self

    @property
    def enabled(self) -> bool:
        """Whether the servers serve HTTPS (a certificate and key are set)."""
        return self.tls_cert is not None

    @property
    def mutual(self) -> bool:
        """Whether the servers require client certificates (FLOWLINE_TLS_CLIENT_CA)."""
        return self.tls_client_ca is not None


def _no_password() -> bytes:
    # Without a password callback OpenSSL would ask for an encrypted key's password on
    # the terminal, and a service started in the background would wait forever.
    raise ValueError("the key is encrypted; give an unencrypted one")


def _loads(name: str, load: Callable[[ssl.SSLContext], object]) -> None:
    """Run ``load`` on a scratch context; an unreadable file is a one-line ValueError."""
    try:
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ValueError(f"{name}: cannot load ({reason})") from None


def uvicorn_ssl_options(settings: TlsSettings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for ``settings``; empty when TLS is off.

    Under mutual TLS the handshake fails for a client without a certificate signed
    by FLOWLINE_TLS_CLIENT_CA, before any request reaches the app.
    """
    if not settings.enabled:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert),
        "ssl_keyfile": str(settings.tls_key),
    }
    if settings.mutual:
        options["ssl_ca_certs"] = str(settings.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def client_tls(settings: TlsSettings) -> tuple[str | bool, tuple[str, str] | None]:
    """``(verify, cert)`` for requests (``verify=``, ``cert=``) and httpx alike.

    verify: the FLOWLINE_TLS_CA path, else True (the system store; requests still
    honours REQUESTS_CA_BUNDLE then). cert: ``(certificate, key)`` when this process
    has them, so calls to a server under mutual TLS present a client certificate
    (sent only when a server asks for one), else None.
    """
    verify: str | bool = str(settings.tls_ca) if settings.tls_ca is not None else True
    cert = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        cert = (str(settings.tls_cert), str(settings.tls_key))
    return verify, cert


def client_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """The same trust and client certificate as :func:`client_tls`, as an SSLContext.

    httpx 0.28 deprecates ``verify=<path>`` and ``cert=``: its clients take this.
    """
    verify, cert = client_tls(settings)
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def scheme(settings: TlsSettings) -> Literal["https", "http"]:
    """The URL scheme of a flowline server run with ``settings``."""
    return "https" if settings.enabled else "http"


def grpc_server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for ``grpc.Server.add_secure_port``; None when TLS is off (insecure port).

    Under mutual TLS the server requires client certificates signed by
    FLOWLINE_TLS_CLIENT_CA, as the HTTP servers do.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    import grpc

    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=bool(client_ca),
    )


# --- a local PKI for `flowline up --tls` ------------------------------------------------


@dataclass(frozen=True)
class LocalPki:
    """Where :func:`generate_local_pki` keeps a local CA and the certificate it signed."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def at(cls, directory: Path) -> LocalPki:
        """The file paths under ``directory`` (whether or not they exist yet)."""
        return cls(
            directory / "ca.pem",
            directory / "ca-key.pem",
            directory / "cert.pem",
            directory / "key.pem",
        )

    def exists(self) -> bool:
        """Whether all four files are there."""
        return all(path.is_file() for path in (self.ca_cert, self.ca_key, self.cert, self.key))

    def settings(self, mutual: bool = False) -> TlsSettings:
        """TlsSettings serving with this certificate and trusting this CA (and, with
        ``mutual``, requiring client certificates it signed); nothing from the environment."""
        return TlsSettings(
            tls_cert=self.cert,
            tls_key=self.key,
            tls_ca=self.ca_cert,
            tls_client_ca=self.ca_cert if mutual else None,
        )


def generate_local_pki(directory: Path, hosts: list[str]) -> LocalPki:
    """A local CA and one server-and-client certificate it signed, under ``directory``.

    The certificate names 127.0.0.1, ::1 and localhost plus ``hosts`` (IP addresses
    or DNS names) and carries both serverAuth and clientAuth, so every role can
    serve with it and present it to the others under mutual TLS. Files (PEM, all
    mode 0600, the folder 0700): ca.pem, ca-key.pem, cert.pem, key.pem.

    Idempotent: valid files are reused. The CA is made again only when it is missing,
    unreadable or near its end (it is what users were told to trust); the
    certificate also when it does not name every host or was not signed by this CA.
    """

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    pki = LocalPki.at(directory)
    names = list(dict.fromkeys([*LOOPBACK_HOSTS, *hosts]))
    now = datetime.datetime.now(datetime.UTC)
    ca = _load_pair(pki.ca_cert, pki.ca_key, now)
    if ca is None:
        ca = _make_ca(now)
        _write_pem(pki.ca_key, _key_pem(ca[1]))
        _write_pem(pki.ca_cert, _cert_pem(ca[0]))
    leaf = _load_pair(pki.cert, pki.key, now)
    if leaf is None or not _leaf_fits(leaf[0], ca[0], names):
        key = _new_key()
        cert = _make_leaf(key, ca, names, now)
        _write_pem(pki.key, _key_pem(key))
        _write_pem(pki.cert, _cert_pem(cert))
    for path in (pki.ca_cert, pki.ca_key, pki.cert, pki.key):
        path.chmod(0o600)  # files an older run or another tool left looser
    return pki


def _new_key() -> ec.EllipticCurvePrivateKey:

    # P-256: small, fast handshakes, accepted by OpenSSL, browsers, curl and grpc.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pem(path: Path, data: bytes) -> None:
    """Write ``data`` owner-only (0600 from creation on), atomically: readers never see
    half a key, and a crash leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _load_pair(
    cert_path: Path, key_path: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """A certificate and its key from disk, or None when missing, unreadable, not a
    pair, or not valid from now until RENEW_BEFORE ahead."""

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - RENEW_BEFORE:
        return None
    return cert, key


def _leaf_fits(cert: x509.Certificate, ca: x509.Certificate, names: list[str]) -> bool:
    """Whether ``cert`` was signed by ``ca`` and names every one of ``names``."""

    try:
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.InvalidSignature, x509.ExtensionNotFound):
        return False
    present = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    present |= set(san.get_values_for_type(x509.DNSName))
    return all(str(_general_name(name).value) in present for name in names)


def _general_name(host: str) -> x509.GeneralName:

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension allowing only ``allowed`` (its argument names)."""
    return x509.KeyUsage(**{usage: usage in allowed for usage in KEY_USAGES})


def _make_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:

    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        # path_length 0: this CA signs end certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    key: ec.EllipticCurvePrivateKey,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    names: list[str],
    now: datetime.datetime,
) -> x509.Certificate:

    ca_cert, ca_key = ca
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(LEAF_NAME))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature"), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

"""Throw-away PKI for the TLS tests: a CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


DEFAULT_VALIDITY = (-datetime.timedelta(minutes=5), datetime.timedelta(days=1))  # from, to: relative to now


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key) -> tuple[str, str]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False,
           valid: tuple[datetime.timedelta, datetime.timedelta] = DEFAULT_VALIDITY):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path, key=None, valid=DEFAULT_VALIDITY) -> dict[str, str]:
    """Paths: ca, server_cert, server_key, client_cert, client_key, and a second CA (other_ca) that signed nothing
    the server trusts. `key`: makes the server's private key (default: P-256); `valid`: the server certificate's
    validity, (from, to) relative to now."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _issue("loraplex test CA", ca_key, None, None, ca=True)
    ca_path, _ = _write(directory / "ca", ca, ca_key)
    server_key = (key or _key)()
    server_cert, server_key_path = _write(directory / "server", _issue("localhost", server_key, ca.subject, ca_key,
                                                                       server=True, valid=valid), server_key)
    client_key = _key()
    client_cert, client_key_path = _write(directory / "client", _issue("test client", client_key, ca.subject, ca_key),
                                          client_key)
    other_key = _key()
    rogue = _issue("rogue client", other_key, None, None)  # self-signed: not from the server's client CA
    rogue_cert, rogue_key = _write(directory / "rogue", rogue, other_key)
    return {"ca": ca_path, "server_cert": server_cert, "server_key": server_key_path, "client_cert": client_cert,
            "client_key": client_key_path, "rogue_cert": rogue_cert, "rogue_key": rogue_key}

"""The server's TLS credentials from the --tls-* files, checked first so that a wrong file is named, and read again
when they change: a renewed certificate is served to new connections without a restart."""
from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import grpc

from server.config import ConfigError, ServerConfig
from server.watched_files import WatchedFiles

log = logging.getLogger("loraplex.tls")
EXPIRY_WARNING_DAYS = 14  # a certificate closer to its end than this is warned of at start and when read again
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def check_pem(config: ServerConfig) -> None:
    """grpc takes any bytes here and fails later, at bind, as if the port were the problem: the files are parsed
    now (with Python's ssl, OpenSSL like grpc's) so that a wrong one is named."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")  # parse only: what grpc accepts (small keys too) must pass here
    try:  # an empty password: an encrypted key fails here instead of prompting on the terminal
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if reason == "KEY_VALUES_MISMATCH":
            reason = "the key is not the certificate's"
        raise ConfigError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a PEM certificate chain "
                          f"and its unencrypted private key ({reason})") from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except OSError as exc:  # ssl.SSLError, or the file gone (a rotation replacing it) since it was read
            raise ConfigError(f"--tls-client-ca {config.tls_client_ca}: not PEM CA certificates "
                              f"({getattr(exc, 'reason', None) or exc.strerror or exc})") from None


def validity(pem: bytes) -> tuple[datetime, datetime] | None:
    """(notBefore, notAfter) of the first certificate in a PEM chain, read from its DER (Python's ssl has no public
    reader for a certificate it does not verify); None where it cannot be read (ssl has accepted the file by then)."""
    found = _PEM_CERTIFICATE.search(pem)
    try:
        der = base64.b64decode(found[1], validate=False) if found else b""

        def element(at: int) -> tuple[int, int, int]:  # (tag, start of content, end)
            tag, length, at = der[at], der[at + 1], at + 2
            if length & 0x80:
                width = length & 0x7F
                length, at = int.from_bytes(der[at:at + width], "big"), at + width
            return tag, at, at + length

        at = element(element(0)[1])[1]  # inside Certificate, then inside TBSCertificate
        tag, _, end = element(at)
        at = end if tag == 0xA0 else at  # [0] version, absent in v1 certificates
        for _ in range(3):  # serialNumber, signature, issuer
            at = element(at)[2]
        at = element(at)[1]  # inside Validity
        times = []
        for _ in range(2):
            tag, start, at = element(at)
            text = der[start:at].decode("ascii")
            if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280)
                text = ("19" if int(text[:2]) >= 50 else "20") + text
            times.append(datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc))
    except (IndexError, ValueError, binascii.Error):
        return None
    return times[0], times[1]


def _warn_of_validity(path: str, found: tuple[datetime, datetime] | None) -> float | None:
    """notAfter as Unix time, after logging a certificate (its `validity`) that is not, or soon no longer, valid:
    clients refuse it in their handshake, which the server's log would not otherwise show."""
    if found is None:
        return None
    start, end = found
    now = datetime.now(timezone.utc)
    if end <= now:
        log.error("--tls-cert %s expired on %s: clients refuse it; renew it (it is read again when it changes)",
                  path, end.isoformat())
    elif start > now:
        log.error("--tls-cert %s is not valid before %s: clients refuse it until then", path, start.isoformat())
    elif (end - now).days < EXPIRY_WARNING_DAYS:
        log.warning("--tls-cert %s expires on %s; renew it (it is read again when it changes)", path, end.isoformat())
    return end.timestamp()


def _grpc_serves(key: bytes, cert: bytes) -> bool | None:
    """Whether grpc's TLS (BoringSSL) takes the pair: it serves fewer key types than the OpenSSL check_pem reads
    them with (brainpool or secp256k1 keys pass there and then fail grpc's bind, as if the port were taken, or are
    set aside by its rotation while the old pair stays). A throwaway server binds it on an ephemeral loopback port;
    None where that cannot tell (no loopback to bind)."""
    probe = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        try:
            probe.add_insecure_port("127.0.0.1:0")
        except RuntimeError:
            return None
        try:
            probe.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
        except RuntimeError:
            return False
        return True
    finally:  # a server never started keeps its bound sockets after stop(): started, its stop closes them
        probe.start()
        probe.stop(None).wait()


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _configuration(config: ServerConfig, on_certificate: Callable[[float], None], renewal: bool):
    """The files' configuration for grpc, checked; a `renewal` (not the start's) whose certificate has expired is
    refused (the one in force may still be valid)."""
    files = [(config.tls_key, "--tls-key"), (config.tls_cert, "--tls-cert")]
    if config.tls_client_ca:
        files.append((config.tls_client_ca, "--tls-client-ca"))
    for _ in range(3):  # the checked files must be the ones handed to grpc: read until a rotation is not under way
        contents = [_read(*file) for file in files]
        check_pem(config)
        if [_read(*file) for file in files] == contents:
            break
    else:
        raise ConfigError("the files kept changing while being read")
    if _grpc_serves(contents[0], contents[1]) is False:
        raise ConfigError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: gRPC's TLS (BoringSSL) cannot "
                          f"serve this key type (brainpool and secp256k1 curves, say); use an RSA, P-256, P-384 or "
                          f"Ed25519 key")
    found = validity(contents[1])
    if renewal and found is not None and found[1] <= datetime.now(timezone.utc):
        raise ConfigError(f"--tls-cert {config.tls_cert} expired on {found[1].isoformat()}")
    not_after = _warn_of_validity(config.tls_cert, found)
    if not_after is not None:
        on_certificate(not_after)
    return grpc.ssl_server_certificate_configuration([(contents[0], contents[1])],
                                                     root_certificates=contents[2] if config.tls_client_ca else None)


def tls_credentials(config: ServerConfig,
                    on_certificate: Callable[[float], None] = lambda not_after: None) -> grpc.ServerCredentials:
    """Credentials whose files are read again (at most every second) when a new connection arrives after they
    changed; new files that do not fit keep the previous ones in force, logged. `on_certificate(not_after)` is told
    each certificate's expiry as it comes into force."""
    files = [config.tls_cert, config.tls_key, *([config.tls_client_ca] if config.tls_client_ca else [])]
    started: list[bool] = []
    watched = WatchedFiles(files, lambda: _configuration(config, on_certificate, renewal=bool(started)),
                           "--tls-cert/--tls-key" + ("/--tls-client-ca" if config.tls_client_ca else ""))
    started.append(True)
    handed, lock = [watched.version], threading.Lock()

    def fetch():  # grpc asks before each new connection's handshake (on its threads): None keeps what is in force
        with lock:
            current = watched.current()
            if watched.version == handed[0]:
                return None
            handed[0] = watched.version
            return current
    return grpc.dynamic_ssl_server_credentials(watched.value, fetch,
                                               require_client_authentication=bool(config.tls_client_ca))

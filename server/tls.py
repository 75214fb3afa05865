"""The server's TLS credentials from the --tls-* files, checked first so that a wrong file is named."""
from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from server.config import ConfigError, ServerConfig


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
        except ssl.SSLError as exc:
            raise ConfigError(f"--tls-client-ca {config.tls_client_ca}: not PEM CA certificates "
                              f"({exc.reason or exc})") from None


def tls_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    chain = [(read(config.tls_key, "--tls-key"), read(config.tls_cert, "--tls-cert"))]
    check_pem(config)
    if config.tls_client_ca:
        return grpc.ssl_server_credentials(chain, root_certificates=read(config.tls_client_ca, "--tls-client-ca"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(chain)

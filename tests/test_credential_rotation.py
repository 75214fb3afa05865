"""Credentials rotate without a restart: a renewed --tls-cert/--tls-key is served to new connections, a token file
is read again when it changes, and new files that do not fit leave the previous ones in force."""
import datetime
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from clients.client import Client, Tls
from server import watched_files
from server.tls import validity
from tests.certs import make_pki
from tests.helpers import scrape, start_server, status_of, wait_for

USER, NEW_USER = "user-token-0123456789abcdef", "renewed-token-0123456789abcdef"
EXPIRY = "loraplex_tls_certificate_expiry_timestamp_seconds"


@pytest.fixture(autouse=True)
def checked_at_once(monkeypatch):
    monkeypatch.setattr(watched_files, "CHECK_SECONDS", 0.0)  # the tests need not wait out the once-a-second look


def _replace(source: str, target: str) -> None:
    """As a secret volume or cert-manager swaps a file: a new file renamed over the old one."""
    shutil.copy(source, target + ".new")
    os.replace(target + ".new", target)


def _not_after(path: str) -> float:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc.timestamp()


def _code(call) -> grpc.StatusCode | None:
    """The status `call()` ends with: None for OK."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def _answers(server, ca: str) -> grpc.StatusCode | None:
    with Client(server.target, timeout=10, tls=Tls(ca=ca)) as client:  # a new channel: a new handshake
        return _code(client.server_info)


def test_a_renewed_certificate_is_served_to_new_connections_and_a_broken_one_is_not(model_dirs, tmp_path, caplog):
    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second", valid=(
        -datetime.timedelta(minutes=5), datetime.timedelta(days=90)))
    cert, key = str(tmp_path / "server.crt"), str(tmp_path / "server.key")
    shutil.copy(first["server_cert"], cert)
    shutil.copy(first["server_key"], key)
    server = start_server(model_dirs["llama"], None, tls_cert=cert, tls_key=key)
    try:
        with Client(server.target, timeout=10, tls=Tls(ca=first["ca"])) as kept:  # a connection made before
            assert kept.server_info().model
            assert scrape(server)[EXPIRY] == _not_after(first["server_cert"])
            _replace(second["server_cert"], cert)
            _replace(second["server_key"], key)
            assert _answers(server, second["ca"]) is None
            assert _answers(server, first["ca"]) == grpc.StatusCode.UNAVAILABLE  # the old certificate is gone
            assert kept.server_info().model  # an open connection keeps its session
            assert scrape(server)[EXPIRY] == _not_after(second["server_cert"])
            with caplog.at_level(logging.ERROR, logger="loraplex.files"):
                _replace(first["server_cert"], cert)  # the old certificate with the new key: no pair
                assert _answers(server, second["ca"]) is None  # the previous files stay in force
            assert "the previous ones stay in force" in caplog.text and "the key is not the certificate's" in \
                caplog.text
            _replace(first["server_key"], key)  # the pair completed: in force
            assert _answers(server, first["ca"]) is None
            expired = make_pki(tmp_path / "expired", valid=(-datetime.timedelta(days=9), -datetime.timedelta(days=1)))
            with caplog.at_level(logging.ERROR, logger="loraplex.files"):
                _replace(expired["server_key"], key)
                _replace(expired["server_cert"], cert)  # a renewal already expired: the valid one stays
                assert _answers(server, first["ca"]) is None
            assert "expired on" in caplog.text and _answers(server, expired["ca"]) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_a_token_file_is_read_again_when_it_changes(model_dirs, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text(USER + "\n")
    server = start_server(model_dirs["llama"], None, auth_token_file=str(tokens))
    try:
        with Client(server.target, timeout=10, token=USER) as old, \
                Client(server.target, timeout=10, token=NEW_USER) as new:
            assert old.server_info().model
            assert status_of(new.server_info)[0] == grpc.StatusCode.UNAUTHENTICATED
            tokens.write_text(f"# rotated\n{NEW_USER}\n")
            assert wait_for(lambda: _code(old.server_info) == grpc.StatusCode.UNAUTHENTICATED)  # revoked
            assert new.server_info().model
            with caplog.at_level(logging.ERROR, logger="loraplex.files"):
                tokens.write_text("short\n")  # invalid: the tokens in force stay
                assert wait_for(lambda: new.server_info() and "the previous ones stay in force" in caplog.text)
            assert "at least 16 characters" in caplog.text and "short" not in caplog.text.split("characters")[-1]
            assert new.server_info().model
            tokens.unlink()  # deleted: still the tokens in force, never an open server
            assert wait_for(lambda: new.server_info() and "No such file" in caplog.text)  # read on a call
            assert status_of(old.server_info)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert new.server_info().model
    finally:
        server.stop()


@pytest.mark.parametrize("start, end, said", [
    (-13, -3, "expired on"), (-1, 5, "expires on"), (2, 30, "is not valid before"),
    (-1, 40 * 365, None)])  # past 2049: GeneralizedTime, not UTCTime
def test_a_certificates_validity_is_read_and_its_end_warned_of(tmp_path, caplog, start, end, said):
    from server.tls import _warn_of_validity
    pki = make_pki(tmp_path, valid=(datetime.timedelta(days=start), datetime.timedelta(days=end)))
    pem = Path(pki["server_cert"]).read_bytes()
    certificate = x509.load_pem_x509_certificate(pem)
    assert validity(pem + Path(pki["ca"]).read_bytes()) == (  # a chain: the first certificate's
        certificate.not_valid_before_utc.replace(microsecond=0), certificate.not_valid_after_utc)
    with caplog.at_level(logging.WARNING, logger="loraplex.tls"):
        assert _warn_of_validity("server.crt", validity(pem)) == certificate.not_valid_after_utc.timestamp()
    assert (said in caplog.text) if said else not caplog.text
    assert validity(b"no certificate") is None


def test_a_key_grpc_cannot_serve_is_named_at_start_and_kept_out_at_rotation(model_dirs, tmp_path, caplog):
    """QA: a brainpool key, which OpenSSL reads but gRPC's BoringSSL does not serve, failed the start as "the port is
    in use", and a rotation to it was logged as read and put in the expiry gauge while gRPC kept the old pair."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from server.config import ConfigError, ServerConfig
    from server.tls import tls_credentials
    good = make_pki(tmp_path / "good")
    brainpool = make_pki(tmp_path / "bp", key=lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
                         valid=(-datetime.timedelta(minutes=5), datetime.timedelta(days=400)))
    with pytest.raises(ConfigError, match=r"--tls-cert .* / --tls-key .*: gRPC's TLS \(BoringSSL\) cannot serve"):
        tls_credentials(ServerConfig(tls_cert=brainpool["server_cert"], tls_key=brainpool["server_key"]))
    cert, key = str(tmp_path / "server.crt"), str(tmp_path / "server.key")
    shutil.copy(good["server_cert"], cert)
    shutil.copy(good["server_key"], key)
    server = start_server(model_dirs["llama"], None, tls_cert=cert, tls_key=key)
    try:
        with caplog.at_level(logging.ERROR, logger="loraplex.files"):
            _replace(brainpool["server_key"], key)
            _replace(brainpool["server_cert"], cert)
            assert _answers(server, good["ca"]) is None  # the pair in force stays
        assert "cannot serve this key type" in caplog.text
        assert scrape(server)[EXPIRY] == _not_after(good["server_cert"])  # the gauge says what is served
    finally:
        server.stop()


def test_the_check_that_grpc_serves_a_key_leaves_no_socket_open(tmp_path):
    """Review: each check (every rotation) left its probe's bound sockets open, 900 descriptors after 600 checks."""
    from server.tls import _grpc_serves
    pki = make_pki(tmp_path)
    pair = Path(pki["server_key"]).read_bytes(), Path(pki["server_cert"]).read_bytes()
    assert _grpc_serves(*pair)
    before = len(os.listdir("/proc/self/fd"))
    assert all(_grpc_serves(*pair) for _ in range(20))
    assert len(os.listdir("/proc/self/fd")) <= before + 2

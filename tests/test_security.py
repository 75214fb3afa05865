"""Bearer-token auth (user and admin tokens) and TLS / mutual TLS, through the real server and real clients."""
import logging
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients import cli
from clients.client import Client, Tls, token_from
from server.auth import TokenFileError, read_tokens
from tests.certs import make_pki
from tests.helpers import make_peft_adapter, start_server, status_of

C = grpc.StatusCode
USER, ADMIN, WRONG = "user-token-0123456789abcdef", "admin-token-0123456789abcdef", "not-the-token-0123456789"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    (d / "user").write_text(f"# user tokens\n{USER}\n\nsecond-user-token-0123456789\n")
    (d / "admin").write_text(ADMIN + "\n")
    (d / "client").write_text(USER + "\n")
    return d


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root, tokens):
    s = start_server(model_dirs["llama"], adapter_root, auth_token_file=str(tokens / "user"),
                     admin_token_file=str(tokens / "admin"), log_level="DEBUG")
    yield s
    s.stop()


def test_no_or_wrong_token_is_unauthenticated(server):
    with Client(server.target, timeout=30) as anonymous:
        code, details = status_of(anonymous.generate, "hi", max_new_tokens=2)
        assert code == C.UNAUTHENTICATED and "authorization: Bearer" in details and "--token-file" in details
        assert status_of(anonymous.list_adapters)[0] == C.UNAUTHENTICATED
        assert status_of(lambda: list(anonymous.generate_stream("hi", max_new_tokens=2)))[0] == C.UNAUTHENTICATED
    with Client(server.target, timeout=30, token=WRONG) as wrong:
        code, details = status_of(wrong.generate, "hi", max_new_tokens=2)
        assert code == C.UNAUTHENTICATED and WRONG not in details
        assert status_of(wrong.load_adapter, "a1")[0] == C.UNAUTHENTICATED


def test_user_token_serves_but_cannot_mutate_adapters(server):
    for token in (USER, "second-user-token-0123456789"):
        with Client(server.target, timeout=30, token=token) as user:
            assert len(user.generate("hi", max_new_tokens=3).token_ids) == 3
            assert len(list(user.generate_stream("hi", "a1", max_new_tokens=2))) >= 2
            info = user.server_info()
            assert info.auth_required and info.admin_auth_required
            code, details = status_of(user.load_adapter, "a1", replace=True)
            assert code == C.PERMISSION_DENIED and "admin token" in details
            assert status_of(user.unload_adapter, "a1")[0] == C.PERMISSION_DENIED


def test_admin_token_mutates_and_serves(server):
    with Client(server.target, timeout=30, token=ADMIN) as admin:
        assert admin.load_adapter("a1", replace=True).adapter_id == "a1"
        assert len(admin.generate("hi", "a1", max_new_tokens=2).token_ids) == 2
        assert admin.unload_adapter("a1").adapter_id == "a1"


def test_a_deploy_is_checked_for_the_admin_token_before_training(server, adapter_root, tmp_path):
    from loader.deploy import DeployError, check
    root = adapter_root  # the server's: a deploy proves it is
    with pytest.raises(DeployError, match="PERMISSION_DENIED"):
        check(server.target, root, [tmp_path / "x"], token=USER)
    check(server.target, root, [tmp_path / "x"], token=ADMIN)  # may load: the probe changed nothing
    with Client(server.target, timeout=30, token=ADMIN) as admin:
        assert "x" not in [a.adapter_id for a in admin.list_adapters()]


def test_health_and_reflection_need_no_token(server):
    with Client(server.target, timeout=30) as anonymous:
        assert anonymous.health() == 1  # SERVING
    with grpc.insecure_channel(server.target) as channel:
        assert "loraplex.v1.Inference" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_tokens_never_reach_the_log(server, caplog):
    caplog.set_level(logging.DEBUG)
    with Client(server.target, timeout=30, token=WRONG) as wrong:
        status_of(wrong.generate, "hi", max_new_tokens=2)
    with Client(server.target, timeout=30, token=USER) as user:
        user.generate("hi", max_new_tokens=2)
        status_of(user.load_adapter, "a1")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(t in text for t in (USER, ADMIN, WRONG))
    assert "LoadAdapter refused: PERMISSION_DENIED" in text  # refused changes are in the audit trail


def test_cli_takes_the_token_from_a_file_or_the_environment_never_argv(server, tokens, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hi", "--target", server.target, "--max-new-tokens", "2",
                  "--token-file", str(tokens / "client")])
    assert exit_info.value.code == 0
    monkeypatch.setenv("LORAPLEX_TOKEN", USER)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["adapters", "list", "--target", server.target])
    assert exit_info.value.code == 0
    monkeypatch.delenv("LORAPLEX_TOKEN")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["adapters", "list", "--target", server.target])
    assert exit_info.value.code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # there is no flag that would put a token in argv
        cli.main(["generate", "hi", "--target", server.target, "--token", USER])
    assert exit_info.value.code == 2


def test_the_token_variable_is_stripped_as_the_file_is(server, monkeypatch, capsys):
    """A mounted secret ends in a newline: the file was stripped, the variable sent as is (INTERNAL)."""
    monkeypatch.setenv("LORAPLEX_TOKEN", f" {USER}\n")
    assert token_from(None) == USER
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hi", "--target", server.target, "--max-new-tokens", "2"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    monkeypatch.setenv("LORAPLEX_TOKEN", "\n")
    assert token_from(None) is None


@pytest.mark.parametrize("token,what", [(USER[:5] + " " + USER[5:], "character 6 of 28 is whitespace"),
                                        (USER + "\x07", "character 28 of 28 is a control character"),
                                        (USER[:-1] + "\u00e9", "character 27 of 27 is a non-ASCII character")])
def test_a_token_that_cannot_be_a_header_value_is_refused_naming_where_it_came_from(server, tokens, monkeypatch,
                                                                                     capsys, tmp_path, token, what):
    """It failed at the first call: INTERNAL "Invalid metadata" (sync, the CLI) or an ExecuteBatchError that is
    no grpc.RpcError (asyncio). Now the client refuses it when built, never showing it."""
    import asyncio
    from clients.client import AsyncClient
    rule = "a token must be printable ASCII without spaces"
    with pytest.raises(ValueError, match=f"^token: {rule} .*: {what}$") as info:
        Client(server.target, token=token)
    assert token not in str(info.value)
    with pytest.raises(ValueError, match=f"^token: {rule}"):
        asyncio.run(AsyncClient(server.target, token=token).close())
    with pytest.raises(TypeError, match="token must be a str, not bytes"):
        Client(server.target, token=USER.encode())
    monkeypatch.setenv("LORAPLEX_TOKEN", token)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["adapters", "list", "--target", server.target])
    assert str(exit_info.value.code).startswith(f"error: $LORAPLEX_TOKEN: {rule}")  # printed, exit status 1
    if " " not in token:  # the token file's own rule names inner whitespace
        (tmp_path / "token").write_text(token + "\n")
        with pytest.raises(ValueError, match=f"^token file {tmp_path / 'token'}: {rule}"):
            token_from(str(tmp_path / "token"))


def test_token_files_are_checked(tmp_path):
    (tmp_path / "empty").write_text("# nothing\n\n")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(TokenFileError, match="holds no token"):
        read_tokens(str(tmp_path / "empty"))
    with pytest.raises(TokenFileError, match="at least 16"):
        read_tokens(str(tmp_path / "short"))
    with pytest.raises(TokenFileError, match="cannot read"):
        read_tokens(str(tmp_path / "missing"))
    (tmp_path / "inline").write_text("user-token-bbbbbbbbbbbb # the CI's token\n")  # would never match
    with pytest.raises(TokenFileError, match="a token cannot hold whitespace"):
        read_tokens(str(tmp_path / "inline"))


def test_tls_files_that_do_not_fit_are_named(pki, tmp_path):
    """A server key that is not its certificate's, or a CA file that is no PEM, is named at start-up (grpc failed
    at bind, as if the port were taken); a client certificate without its key is an error, not an abort."""
    from server.tls import check_pem
    from server.config import ConfigError, ServerConfig
    with pytest.raises(ConfigError, match=r"--tls-key .*: not a PEM .* private key \(the key is not the certificate's"):
        check_pem(ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["rogue_key"]))
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="--tls-client-ca .*: not PEM CA certificates"):
        check_pem(ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                                tls_client_ca=str(tmp_path / "ca.pem")))
    check_pem(ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]))
    # an encrypted key (grpc cannot use one) fails at once instead of prompting for a passphrase
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = serialization.load_pem_private_key(Path(pki["server_key"]).read_bytes(), password=None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "locked.key").write_bytes(locked)
    with pytest.raises(ConfigError, match="unencrypted private key"):
        check_pem(ServerConfig(tls_cert=pki["server_cert"], tls_key=str(tmp_path / "locked.key")))
    # what grpc accepts passes, small keys included (OpenSSL's default security level would refuse 1024-bit RSA)
    small = make_pki(tmp_path / "small", key=lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024))
    check_pem(ServerConfig(tls_cert=small["server_cert"], tls_key=small["server_key"]))
    with pytest.raises(ValueError, match="a client certificate and its key go together"):
        Tls(ca=pki["ca"], cert=pki["client_cert"]).credentials()
    (tmp_path / "client-token").write_text(f"{USER} # the CI's\n")
    with pytest.raises(ValueError, match="a token cannot hold whitespace"):
        token_from(str(tmp_path / "client-token"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_generate_over_tls(model_dirs, adapter_root, pki):
    server = start_server(model_dirs["llama"], adapter_root, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        with Client(server.target, timeout=30, tls=Tls(ca=pki["ca"])) as client:
            reply = client.generate("hi", "a1", max_new_tokens=4)
            assert len(reply.token_ids) == 4
            assert client.server_info().model
        with Client(server.target, timeout=5) as plaintext:
            assert status_of(plaintext.generate, "hi", max_new_tokens=2)[0] == C.UNAVAILABLE
        with Client(server.target, timeout=5, tls=Tls(ca=pki["rogue_cert"])) as untrusting:  # wrong CA
            assert status_of(untrusting.generate, "hi", max_new_tokens=2)[0] == C.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_with_tokens_end_to_end(model_dirs, adapter_root, pki, tokens, capsys):
    server = start_server(model_dirs["llama"], adapter_root, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                          tls_client_ca=pki["ca"], auth_token_file=str(tokens / "user"))
    try:
        mutual = Tls(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
        with Client(server.target, timeout=30, tls=mutual, token=USER) as client:
            streamed = list(client.generate_stream("hi", "a1", max_new_tokens=3))
            assert streamed[-1].usage.completion_tokens == 3
        with Client(server.target, timeout=30, tls=mutual) as no_token:
            assert status_of(no_token.generate, "hi", max_new_tokens=2)[0] == C.UNAUTHENTICATED
        with Client(server.target, timeout=5, tls=Tls(ca=pki["ca"]), token=USER) as no_cert:
            assert status_of(no_cert.generate, "hi", max_new_tokens=2)[0] == C.UNAVAILABLE
        rogue = Tls(ca=pki["ca"], cert=pki["rogue_cert"], key=pki["rogue_key"])
        with Client(server.target, timeout=5, tls=rogue, token=USER) as stranger:
            assert status_of(stranger.generate, "hi", max_new_tokens=2)[0] == C.UNAVAILABLE
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "hi", "--target", server.target, "--max-new-tokens", "2",
                      "--token-file", str(tokens / "client"), "--tls-ca", pki["ca"],
                      "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"]])
        assert exit_info.value.code == 0
        assert "2 completion tokens" in capsys.readouterr().err
    finally:
        server.stop()


@pytest.mark.parametrize("flags,needle", [
    (["--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.crt"], "needs --tls-cert"),
    (["--auth-token-file", "/nonexistent/tokens"], "cannot read token file"),
])
def test_serve_rejects_unworkable_security_flags_in_one_line(flags, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--port", "0", "--metrics-port", "0", *flags])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("host,alone", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                        ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
                                        ("my-host", False)])
def test_loopback_hosts_are_told_from_exposed_ones(host, alone):
    """serve warns when it listens beyond loopback with no tokens (the Docker image's 0.0.0.0, say)."""
    from server.app import _loopback
    assert _loopback(host) is alone


def test_a_malformed_request_is_authenticated_and_admitted_like_any_call(model_dirs, adapter_root, tokens):
    """A body that does not parse was refused before authentication (INVALID_ARGUMENT to a client with no token)
    and before admission, while the call's end still gave a concurrency place back: every such call raised the
    --max-concurrent-rpcs limit by one, for anyone."""
    server = start_server(model_dirs["llama"], adapter_root, auth_token_file=str(tokens / "user"),
                          max_concurrent_rpcs=1)
    bad = b"\xff\xff\xff\xff"
    try:
        with grpc.insecure_channel(server.target) as channel:
            generate = channel.unary_unary("/loraplex.v1.Inference/Generate", request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
            for metadata, code in (((), C.UNAUTHENTICATED), ((("authorization", f"Bearer {USER}"),),
                                                              C.INVALID_ARGUMENT)):
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as err:
                        generate(bad, timeout=10, metadata=metadata)
                    assert err.value.code() == code, err.value.details()
        with Client(server.target, timeout=30, token=USER) as client:  # the limit still holds: one at a time
            stream = client.generate_stream("hi", max_new_tokens=200, ignore_eos=True)
            next(stream)
            code, details = status_of(client.generate, "hi", max_new_tokens=2)
            assert code == C.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in details
            stream.cancel()
    finally:
        server.stop()

"""Bearer-token authentication: user tokens for every RPC, admin tokens for adapter mutations.

Tokens come from files (one per line; blank lines and `#` comments ignored), never from argv, and are never
logged. Comparison is constant-time and runs against every configured token, so timing reveals neither a
token's prefix nor which token matched. Health (for load balancers) and, when enabled, reflection (the schema
only) stay open; everything else needs `authorization: Bearer <token>`. A token file is read again when it changes
(tokens added or revoked without a restart); a change that leaves it invalid keeps the previous tokens, logged.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from server.config import ConfigError
from server.watched_files import WatchedFiles

log = logging.getLogger("loraplex.auth")

ADMIN_METHODS = frozenset({"/loraplex.v1.Adapters/LoadAdapter", "/loraplex.v1.Adapters/UnloadAdapter"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIX = "/grpc.reflection."


class TokenFileError(ConfigError):
    pass


MAX_TOKEN_BYTES = 4096


def read_tokens(path: str) -> tuple[bytes, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {path} is not UTF-8 text") from None
    tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token")
    if any(len(t.split()) > 1 for t in tokens):
        raise TokenFileError(f"token file {path}: a token cannot hold whitespace (one token a line; a comment goes "
                             f"on its own line, starting with #)")
    if any(not all(33 <= byte <= 126 for byte in t) for t in tokens):  # what a client can send in a header
        raise TokenFileError(f"token file {path}: a token must be printable ASCII (no client could send another)")
    if any(len(t) < 16 for t in tokens):
        raise TokenFileError(f"token file {path}: every token must be at least 16 characters")
    if any(len(t) > MAX_TOKEN_BYTES for t in tokens):  # grpc refuses metadata past 8 KiB at random, 16 KiB always
        raise TokenFileError(f"token file {path}: every token must be at most {MAX_TOKEN_BYTES} characters")
    return tokens


def watch_tokens(path: str, flag: str) -> WatchedFiles[tuple[bytes, ...]]:
    return WatchedFiles([path], lambda: read_tokens(path), f"{flag} {path}")


def _matches(presented: bytes, tokens: tuple[bytes, ...]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time taken does not depend on which token matched
        found |= hmac.compare_digest(presented, token)
    return found


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def _deny(code: grpc.StatusCode, details: str, streaming: bool):
    async def abort(request, context):
        await context.abort(code, details)

    async def abort_stream(request, context):  # an async generator, like the streaming handlers it replaces
        await context.abort(code, details)
        yield  # never reached
    return abort_stream if streaming else abort


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, user_tokens: WatchedFiles | None, admin_tokens: WatchedFiles | None,
                 reflection_open: bool) -> None:
        # Without user tokens only the mutations are guarded; without admin tokens the user tokens guard them.
        self.user_tokens, self.admin_tokens = user_tokens, admin_tokens
        self.reflection_open = reflection_open

    def _verdict(self, method: str, token: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(OPEN_PREFIXES) or (self.reflection_open and method.startswith(REFLECTION_PREFIX)):
            return None
        user = self.user_tokens.current() if self.user_tokens else ()
        admin = self.admin_tokens.current() if self.admin_tokens else ()
        is_admin = bool(admin) and token is not None and _matches(token, admin)
        if method in ADMIN_METHODS and admin:
            if is_admin:
                return None
            if token is not None and user and _matches(token, user):
                return grpc.StatusCode.PERMISSION_DENIED, f"{method.rsplit('/', 1)[1]} needs an admin token " \
                                                          "(--admin-token-file); this token is a user token"
            return grpc.StatusCode.UNAUTHENTICATED, _missing(token, "an admin")
        if not user or is_admin or (token is not None and _matches(token, user)):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, _missing(token, "a")

    async def intercept_service(self, continuation, details):
        verdict = self._verdict(details.method, _bearer(details.invocation_metadata))
        handler = await continuation(details)
        if verdict is None or handler is None:
            return handler
        if details.method in ADMIN_METHODS:  # part of the audit trail of adapter changes (the token is never logged)
            log.warning("%s refused: %s", details.method.rsplit("/", 1)[1], verdict[0].name)
        make = {"unary_unary": grpc.unary_unary_rpc_method_handler,
                "unary_stream": grpc.unary_stream_rpc_method_handler,
                "stream_unary": grpc.stream_unary_rpc_method_handler,
                "stream_stream": grpc.stream_stream_rpc_method_handler}
        kind = next(k for k in make if getattr(handler, k))
        return make[kind](_deny(*verdict, streaming=kind.endswith("stream")), handler.request_deserializer,
                          handler.response_serializer)


def _missing(token: bytes | None, which: str) -> str:
    if token is None:
        return f"this server needs {which} token: send metadata 'authorization: Bearer <token>' " \
               "(loraplex CLI: --token-file or LORAPLEX_TOKEN)"
    return f"the bearer token is not valid for this RPC (needs {which} token)"

"""What the `loraplex` commands share: the connection flags (token, TLS), argument types and help that names
defaults."""
from __future__ import annotations

import argparse


def utf8(text: str) -> str:
    """An argparse type: text a request can carry. Python decodes argv bytes that are not UTF-8 (a Latin-1 terminal,
    a file's bytes in "$(cat f)") to lone surrogates, which protobuf and grpc cannot encode: a traceback at the
    call. Here it is argparse's one-line error naming the argument, exit status 2."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({what} at character {err.start + 1}): the shell or "
                                         f"terminal passed text in another encoding") from None
    return text


utf8.__name__ = "text"  # argparse names the type in its message


def seconds(text: str) -> float:
    """An argparse type: a deadline in seconds, > 0 and finite (a grpc deadline it can hold). Zero, a negative, inf
    or NaN were accepted, and the call then failed at once with DEADLINE_EXCEEDED, never sent."""
    from clients.arguments import MAX_TIMEOUT, check_timeout
    value = float(text)
    try:
        return check_timeout(value)  # the bound the Python clients hold a timeout to
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds > 0 and <= {MAX_TIMEOUT:,.0f}") from None


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, help="file holding the bearer token (else $LORAPLEX_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate (TLS)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate chain (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="PEM client private key (mutual TLS)")


def connection(args) -> dict:
    """Client keyword arguments from the connection flags: the token from --token-file or $LORAPLEX_TOKEN (never
    argv, where other users of the machine could read it), TLS when any --tls* flag is given."""
    from clients.client import Tls, token_from
    tls = Tls(args.tls_ca, args.tls_cert, args.tls_key) if args.tls or args.tls_ca or args.tls_cert or args.tls_key \
        else None
    try:
        token = token_from(args.token_file)
        if tls is not None:
            tls.credentials()  # read the PEM files now: a wrong path is a one-line error, not a traceback
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    return {"token": token, "tls": tls}


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that names each flag's default, where it has one to name (not None or a switch's False)."""

    def _get_help_string(self, action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)

"""The `loraplex` command line: serve, generate, adapters {list,load,unload}."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import grpc

from protos.loraplex.v1 import inference_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve(args) -> int:
    from server.app import serve
    from server.config import config_from_args
    config = config_from_args(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


def _generate(args) -> int:
    from clients.client import Client
    with Client(args.target, timeout=args.timeout) as client:
        stream = client.generate_stream(args.prompt, args.adapter, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        seed=args.seed, stop=args.stop or ())
        for message in stream:
            sys.stdout.write(message.text)
            sys.stdout.flush()
            if message.finish_reason:
                sys.stdout.write("\n")
                reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                print(f"[{reason}; {message.usage.prompt_tokens} prompt + {message.usage.completion_tokens} "
                      f"completion tokens]", file=sys.stderr)
    return 0


def _adapters(args) -> int:
    from clients.client import Client
    with Client(args.target, timeout=args.timeout) as client:
        if args.action == "list":
            infos = client.list_adapters()
        elif args.action == "load":
            infos = [client.load_adapter(args.adapter_id, replace=args.replace, pin=args.pin)]
        else:
            client.unload_adapter(args.adapter_id)
            print(f"unloaded {args.adapter_id}")
            return 0
    for info in infos:
        kind = pb.AdapterKind.Name(info.kind).removeprefix("ADAPTER_KIND_").lower()
        tier = pb.AdapterTier.Name(info.tier).removeprefix("ADAPTER_TIER_").lower()
        print(f"{info.adapter_id}\t{kind}\trank={info.rank}\tmodules={len(info.target_modules)}\t"
              f"{info.size_bytes} bytes\ttier={tier}\tversion={info.version}\tpinned={info.pinned}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from server.config import add_serve_arguments
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gRPC server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    def client_args(p):
        p.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
        p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    client_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default="", help="adapter id ('' = base model)")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.set_defaults(func=_generate)

    adapters = sub.add_parser("adapters", help="list, load or unload adapters")
    adapter_sub = adapters.add_subparsers(dest="action", required=True)
    for action in ("list", "load", "unload"):
        p = adapter_sub.add_parser(action)
        client_args(p)
        if action != "list":
            p.add_argument("adapter_id")
        if action == "load":
            p.add_argument("--replace", action="store_true", help="swap in new files for a loaded id")
            p.add_argument("--pin", action="store_true", help="never evict from host memory")
    adapters.set_defaults(func=_adapters)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

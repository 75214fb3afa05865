"""The `loraplex` command line: serve, generate, adapters {list,get,load,unload}, train, merge, build-default."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import grpc

from clients.cli_flags import ShowDefaults, add_connection_arguments, connection, seconds, utf8
from clients.train_cli import add_train_parser
from protos.loraplex.v1 import inference_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve(args) -> int:
    from server.config import ConfigError, check_config, config_from_args
    config = config_from_args(args)
    try:
        check_config(config)  # before server.app's imports (torch, transformers: seconds), as serve does again
        from server.app import serve
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()  # a server's log is read line by line, not as a terminal
        asyncio.run(serve(config))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _template_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = utf8(text).partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=JSON")
    if value.lower() in ("true", "false"):  # Python's True/False too: the string "False" would be true
        return key, value.lower() == "true"
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare word is a string: reasoning_effort=high


def _bias(text: str) -> tuple[int, float]:
    """An argparse type: ID=BIAS (--logit-bias)."""
    token, sep, value = text.partition("=")
    try:
        return _ranged(-2 ** 31, 2 ** 31)(token), float(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS, e.g. 42=-100") from None


def _text_file(path: str) -> str:
    """An argparse type: a UTF-8 text file's contents (a JSON Schema, a grammar)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err}") from None


_text_file.__name__ = "file"


def _generate(args) -> int:
    from clients.client import Client
    bias = dict(args.logit_bias or ())
    if len(bias) < len(args.logit_bias or ()):
        twice = next(t for t, _ in args.logit_bias if sum(u == t for u, _ in args.logit_bias) > 1)
        print(f"error: --logit-bias: token id {twice} is given more than once", file=sys.stderr)
        return 2
    with Client(args.target, timeout=args.timeout, **connection(args)) as client:
        prompt = args.prompt
        kwargs = dict(args.chat_template_kwarg or ()) or None
        if args.chat or args.system is not None or kwargs:  # one user turn, after a system turn where given
            prompt = [{"role": "system", "content": args.system}] * (args.system is not None) + \
                [{"role": "user", "content": args.prompt}]
        stream = client.generate_stream(prompt, args.adapter, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos,
                                        logprobs=args.logprobs, min_p=args.min_p,
                                        repetition_penalty=args.repetition_penalty,
                                        presence_penalty=args.presence_penalty,
                                        frequency_penalty=args.frequency_penalty,
                                        min_new_tokens=args.min_new_tokens, stop_token_ids=args.stop_token_id or (),
                                        chat_template_kwargs=kwargs, prompt_logprobs=args.prompt_logprobs,
                                        logit_bias=bias, cache_salt=args.cache_salt, json_schema=args.json_schema,
                                        json_object=args.json_object, regex=args.regex, choice=args.choice,
                                        grammar=args.grammar, n=args.n)
        logprobs, prompt, texts = [], [], {}
        for message in stream:
            prompt += zip(message.prompt_token_ids[1:], message.prompt_logprobs)
            if args.n is None:
                sys.stdout.write(message.text)
                sys.stdout.flush()
            else:  # each completion printed whole when it ends: their tokens come interleaved
                texts.setdefault(message.index, []).append(message.text)
            what = "token" if args.n is None else f"completion {message.index} token"
            logprobs += ((what, token, found) for token, found in zip(message.token_ids, message.logprobs))
            if message.finish_reason:
                reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                usage = message.usage
                if args.n is None:
                    sys.stdout.write("\n")
                    print(f"[{reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                          file=sys.stderr)
                else:
                    print(f"[completion {message.index}: {reason}; {usage.prompt_tokens} prompt + "
                          f"{usage.completion_tokens} completion tokens]", file=sys.stderr, flush=True)
                    sys.stdout.write("".join(texts.pop(message.index, ())) + "\n")
                    sys.stdout.flush()
    # after the text, on stderr: stdout stays the completions alone
    for what, token, found in [("prompt token", *each) for each in prompt] + logprobs:
        top = ", ".join(f"{t} {v:.4f}" for t, v in zip(found.top_token_ids, found.top_logprobs))
        print(f"{what} {token}: logprob {found.logprob:.4f}" + (f"; most likely {top}" if top else ""),
              file=sys.stderr)
    if prompt:  # what scoring a text is for: its log-likelihood under the adapter, and its perplexity
        total = sum(found.logprob for _, found in prompt)
        print(f"prompt: {len(prompt)} tokens scored, logprob sum {total:.4f}, perplexity "
              f"{math.exp(-total / len(prompt)):.4f}", file=sys.stderr)
    return 0


def _adapters(args) -> int:
    from clients.client import Client
    with Client(args.target, timeout=args.timeout, **connection(args)) as client:
        if args.action == "list":
            infos = client.list_adapters()
        elif args.action == "get":
            infos = [client.get_adapter(args.adapter_id)]
        elif args.action == "load":
            infos = [client.load_adapter(args.adapter_id, replace=args.replace, pin=args.pin)]
        else:
            response = client.unload_adapter(args.adapter_id, drain=args.drain)
            print(f"unloaded {args.adapter_id}" + (f" ({response.drained_requests} requests drained)"
                                                   if response.drained_requests else ""))
            return 0
    for info in infos:
        kind = pb.AdapterKind.Name(info.kind).removeprefix("ADAPTER_KIND_").lower()
        tier = pb.AdapterTier.Name(info.tier).removeprefix("ADAPTER_TIER_").lower()
        extra = f"\theads={info.heads}" if info.heads > 1 else ""
        if info.HasField("reslora"):
            r = info.reslora
            error = f"{r.merge_error:.3e}" if r.HasField("merge_error") else "not recorded"
            extra += f"\tstructure={r.structure}\tpre_num={r.pre_num}\tmerge={r.merge_method}\tmerge_error={error}"
        print(f"{info.adapter_id}\t{kind}\trank={info.rank}\tmodules={len(info.target_modules)}\t"
              f"{info.size_bytes} bytes\ttier={tier}\tversion={info.version}\tpinned={info.pinned}\t"
              f"running={info.active_requests}\twaiting={info.waiting_requests}{extra}")
        if args.action == "get":
            for line in _module_lines(info):
                print(f"  {line}")
    return 0


def _info(args) -> int:
    """GetServerInfo as JSON (proto3's mapping, every field shown: a limit of 0 is printed, not left out)."""
    from google.protobuf.json_format import MessageToJson

    from clients.client import Client
    with Client(args.target, timeout=args.timeout, **connection(args)) as client:
        info = client.server_info()
    print(MessageToJson(info, always_print_fields_with_no_presence=True, preserving_proto_field_name=True))
    return 0


def _module_lines(info: pb.AdapterInfo) -> list[str]:
    """`adapters get`: the target modules, then the modules of each rank (highest first), compactly."""
    lines = [f"target modules: {_compact(info.target_modules)}"] if info.target_modules else []
    by_rank: dict[int, list[str]] = {}
    for module, rank in info.module_ranks.items():
        by_rank.setdefault(rank, []).append(module)
    if len(by_rank) == 1:
        (rank, modules), = by_rank.items()
        return lines + [f"rank {rank}: all {len(modules)} modules"]
    return lines + [f"rank {rank} ({len(modules)} module{'s' * (len(modules) > 1)}): {_compact(modules)}"
                    for rank, modules in sorted(by_rank.items(), reverse=True)]


def _compact(modules) -> str:
    """Module paths with the layers that share the same modules folded together, e.g. 28 paths as
    model.layers.{0-3}.{mlp.down_proj,...,self_attn.v_proj}; groups are separated by spaces."""
    layers: dict[str, dict[int, set[str]]] = {}  # path up to the layer number -> layer -> what follows it
    plain = []
    for module in sorted(modules):
        match = re.fullmatch(r"(.*?\.)(\d+)\.(.+)", module)
        if match:
            layers.setdefault(match[1], {}).setdefault(int(match[2]), set()).add(match[3])
        else:
            plain.append(module)
    groups = []
    for head, tails_of in layers.items():
        by_tails: dict[tuple[str, ...], list[int]] = {}
        for layer, tails in sorted(tails_of.items()):
            by_tails.setdefault(tuple(sorted(tails)), []).append(layer)
        for tails, numbers in sorted(by_tails.items(), key=lambda item: item[1]):
            shared = _shared_prefix(tails)
            groups.append(f"{head}{_braced(_ranges(numbers), len(numbers))}.{shared}"
                          f"{_braced([tail[len(shared):] for tail in tails], len(tails))}")
    return " ".join(plain + groups)


def _shared_prefix(tails) -> str:
    """The dotted parts several paths share at their start: "self_attn." for self_attn.q_proj, self_attn.v_proj."""
    if len(tails) < 2:
        return ""
    parts = [tail.split(".")[:-1] for tail in tails]
    shared = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        shared.append(column[0] + ".")
    return "".join(shared)


def _ranges(numbers: list[int]) -> list[str]:
    """Sorted integers as runs: [0, 1, 2, 5] -> ["0-2", "5"]."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]


def _braced(parts, count: int) -> str:
    """One item as it is; several in braces (a run of layers, 0-3, counts as several)."""
    return parts[0] if count == 1 else "{" + ",".join(parts) + "}"


def _merge(args) -> int:
    from loader.merge import merge_reslora
    from loader.train_data import DataError
    from loader.train_job_spec import JobError
    from server.errors import LoraplexError
    try:
        report = merge_reslora(Path(args.adapter_dir), Path(args.out), args.model, args.eval, args.merge_method,
                               args.max_length, args.device, args.overwrite)
    except (JobError, DataError, LoraplexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    error = report["merge_error"]
    print(f"wrote plain LoRA to {report['out']} ({report['structure']}, {report['merge_method']}); merge error on "
          f"eval data: {'not measured (no --eval)' if error is None else f'{error:.3e}'}")
    return 0


def _build_default(args) -> int:
    if args.quick and not args.out:  # before the imports below (torch, transformers: seconds)
        print("error: --quick builds a wiring check, not a usable model: give --out DIR (without it, it would "
              "replace the shipped built-in model)", file=sys.stderr)
        return 2
    from dataclasses import replace

    from loader.builtin import BUILTIN_DIR, QUICK, BuildError, BuildSettings, build
    from loader.train_data import DataError
    from loader.train_job_spec import JobError
    from server.errors import LoraplexError
    settings = replace(QUICK if args.quick else BuildSettings(), seed=args.seed, device=args.device)
    try:
        report = build(Path(args.out) if args.out else BUILTIN_DIR, settings, args.adapters)
    except (BuildError, JobError, DataError, LoraplexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, value in report["accuracy"].items():
        print(f"{name:24s} {value:6.1%}")
    print(f"built in {report['seconds']:.0f}s")
    return 0


def _ranged(low: int, high: int):
    """An argparse type: an integer the request's protobuf field can hold (low <= value < high); the server checks
    what it means, a value the field cannot carry would fail in the client with a bare ValueError."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high})")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def build_parser() -> argparse.ArgumentParser:
    from loader.builtin_tasks import DEMO_TASKS
    from server.config import add_serve_arguments
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server",
                                     allow_abbrev=False)  # `--token SECRET` must not pass for --token-file
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", allow_abbrev=False, help="start the gRPC server",
                           formatter_class=ShowDefaults)
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    def client_args(p):
        p.add_argument("--target", default=DEFAULT_TARGET, type=utf8,
                       help=f"server address host:port (default {DEFAULT_TARGET})")
        p.add_argument("--timeout", type=seconds, default=None, help="deadline in seconds (default: none)")
        add_connection_arguments(p)

    gen = sub.add_parser("generate", allow_abbrev=False, help="stream a completion to the terminal")
    client_args(gen)
    gen.add_argument("prompt", type=utf8)
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message, through the model's chat template")
    gen.add_argument("--system", type=utf8, default=None, help="a system message before it (implies --chat)")
    gen.add_argument("--chat-template-kwarg", action="append", type=_template_kwarg, metavar="KEY=JSON",
                     help="a value the chat template reads, e.g. enable_thinking=false (repeatable; implies --chat)")
    gen.add_argument("--adapter", default="", type=utf8, help="adapter id ('' = base model)")
    gen.add_argument("--max-new-tokens", type=_ranged(-2 ** 31, 2 ** 31), default=None,
                     help="tokens to generate at most (default: the server's, within the room the prompt leaves)")
    gen.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    gen.add_argument("--top-k", type=_ranged(-2 ** 31, 2 ** 31), default=None, help="sample from the k likeliest")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of this mass")
    gen.add_argument("--min-p", type=float, default=None,
                     help="sample only tokens at least this fraction as likely as the likeliest (0-1)")
    gen.add_argument("--logit-bias", action="append", type=_bias, metavar="TOKEN_ID=BIAS",
                     help="add BIAS (-100 to 100) to the token's logit before the choice (repeatable)")
    gen.add_argument("--repetition-penalty", type=float, default=None,
                     help="divide the logits of tokens the prompt or output holds (HF's; 0.01-100, 1 disables)")
    gen.add_argument("--presence-penalty", type=float, default=None,
                     help="take this off the logits of tokens the output holds (-2 to 2)")
    gen.add_argument("--frequency-penalty", type=float, default=None,
                     help="take this times their count off the logits of tokens the output holds (-2 to 2)")
    gen.add_argument("--seed", type=_ranged(0, 2 ** 64), default=None,
                     help="reproducible sampling, whatever else is in the batch")
    gen.add_argument("--stop", action="append", type=utf8, help="stop sequence (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past end-of-sequence")
    gen.add_argument("--min-new-tokens", type=_ranged(-2 ** 31, 2 ** 31), default=None,
                     help="tokens to generate before end-of-sequence, a stop token or a stop sequence may end it")
    gen.add_argument("--stop-token-id", action="append", type=_ranged(-2 ** 31, 2 ** 31),
                     help="token id that stops generation (repeatable)")
    gen.add_argument("--logprobs", type=_ranged(0, 2 ** 32), default=None, metavar="N",
                     help="print each token's log-probability and the N likeliest tokens' (0-20) to stderr")
    gen.add_argument("--prompt-logprobs", type=_ranged(0, 2 ** 32), default=None, metavar="N",
                     help="the same for each prompt token after the first, given those before it")
    gen.add_argument("--n", type=_ranged(0, 2 ** 32), default=None, metavar="N",
                     help="N completions of the prompt (1-16), each printed when it ends, after a line on stderr")
    gen.add_argument("--cache-salt", type=utf8, default="",
                     help="share computed prompt keys and values only with requests of this salt")
    output = gen.add_mutually_exclusive_group()
    output.add_argument("--json-schema", type=_text_file, metavar="FILE",
                        help="hold the output to the JSON Schema in FILE")
    output.add_argument("--json-object", action="store_true", help="hold the output to a JSON object")
    output.add_argument("--regex", type=utf8, help="hold the output to a match of this regular expression")
    output.add_argument("--choice", action="append", type=utf8,
                        help="hold the output to one of these strings (repeatable)")
    output.add_argument("--grammar", type=_text_file, metavar="FILE",
                        help="hold the output to the Lark grammar in FILE (its start rule)")
    gen.set_defaults(func=_generate)

    info = sub.add_parser("info", allow_abbrev=False, help="the server's model, device and limits, as JSON")
    client_args(info)
    info.set_defaults(func=_info)

    adapters = sub.add_parser("adapters", allow_abbrev=False, help="list, get, load or unload adapters")
    adapter_sub = adapters.add_subparsers(dest="action", required=True)
    for action in ("list", "get", "load", "unload"):
        p = adapter_sub.add_parser(action, allow_abbrev=False)
        client_args(p)
        if action != "list":
            p.add_argument("adapter_id", type=utf8)
        if action == "load":
            p.add_argument("--replace", action="store_true", help="swap in new files for a loaded id")
            pinning = p.add_mutually_exclusive_group()
            pinning.add_argument("--pin", action="store_true", default=None,
                                 help="never evict from host memory (default: a --replace keeps the pin)")
            pinning.add_argument("--unpin", dest="pin", action="store_false", help="make it evictable again")
        if action == "unload":
            p.add_argument("--drain", action="store_true",
                           help="with requests in flight: unload for new ones and wait for these (else refused)")
    adapters.set_defaults(func=_adapters)

    add_train_parser(sub)

    merge = sub.add_parser("merge", allow_abbrev=False,
                           help="write a ResLoRA adapter as a plain PEFT LoRA, measuring the merge error")
    merge.add_argument("adapter_dir")
    merge.add_argument("--out", required=True)
    merge.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    merge.add_argument("--model", default="default", help="the base model the adapter was trained on")
    merge.add_argument("--eval", default=None, help="JSONL eval data to measure the merge error on")
    merge.add_argument("--merge-method", default=None, help="exact (bs), input_norm, weight_norm (is), "
                                                            "input_norm, modified_a (ms); default: the adapter's")
    merge.add_argument("--max-length", type=int, default=256)
    merge.add_argument("--device", default="cpu")
    merge.set_defaults(func=_merge)

    builder = sub.add_parser("build-default", allow_abbrev=False,
                             help="rebuild the built-in model and its demo adapters")
    builder.add_argument("--out", default=None, help="default: models/builtin in the repository")
    builder.add_argument("--quick", action="store_true", help="a few steps only (tests): wiring, not quality")
    builder.add_argument("--seed", type=int, default=0)
    builder.add_argument("--device", default="cpu")
    builder.add_argument("--adapters", nargs="+", default=None, metavar="ID",
                         help=f"retrain only these demo adapters ({', '.join(DEMO_TASKS)}) on the base model and "
                              f"other adapters already built in --out")
    builder.set_defaults(func=_build_default)
    return parser


def _openmp_waits_passively() -> None:
    """Unless the environment says otherwise, torch's OpenMP threads sleep at a barrier instead of spinning.
    Spinning wins a few percent on an idle machine and loses several times over beside any other busy process
    (a trainer, a sidecar, a CPU quota): a spinning thread holds the core its partner needs to finish the parallel
    region. Measured in bench/RESULTS.md ("OpenMP waits"). Only takes effect before torch is first imported."""
    if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _reader_left() -> None:
    """Output piped into a reader that left (`| head -1`): exit quietly, as a tool that SIGPIPE ends (128 + 13).
    Python's way (docs of the signal module): point stdout, and stderr, which may be the same pipe, at /dev/null so
    that the flush at exit raises nothing more; SIGPIPE's default action would also end the process on a gRPC
    socket's broken connection."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # not a file descriptor (output captured in-process)
            pass
    sys.exit(141)


def main(argv: list[str] | None = None) -> None:
    _openmp_waits_passively()
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        if sys.stdout is not None:  # (stdout closed: >&-)
            sys.stdout.flush()  # a reader gone before the last write fails here, not with a traceback at exit
    except BrokenPipeError:
        _reader_left()  # a stream still running is cancelled: its client's channel was closed on the way out
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":  # `python -m clients.cli` (what torchrun runs: `torchrun ... -m clients.cli train`)
    main()

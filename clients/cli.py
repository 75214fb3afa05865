"""The `loraplex` command line: serve, generate, adapters {list,get,load,unload}, train, merge, build-default."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import grpc

from protos.loraplex.v1 import inference_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve(args) -> int:
    from server.app import serve
    from server.config import ConfigError, config_from_args
    config = config_from_args(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # a server's log is read line by line, not as a terminal
    try:
        asyncio.run(serve(config))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _connection(args) -> dict:
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


def _generate(args) -> int:
    from clients.client import Client
    with Client(args.target, timeout=args.timeout, **_connection(args)) as client:
        stream = client.generate_stream(args.prompt, args.adapter, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos)
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
    with Client(args.target, timeout=args.timeout, **_connection(args)) as client:
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
              f"running={info.active_requests}{extra}")
    return 0


def _train(args) -> int:
    try:
        return _train_all(args)
    except KeyboardInterrupt:
        where = args.out or "each job's --out"
        print(f"\ninterrupted: run the same command with --resume to continue from the last checkpoint in {where} "
              f"(written every --eval-every steps)", file=sys.stderr)
        return 130


def _train_all(args) -> int:
    from tqdm import tqdm

    if not args.jobs and not (args.method and args.data and args.out):
        print("error: --method, --data and --out are required (or --jobs)", file=sys.stderr)
        return 2

    from adapters.training import TrainSettings
    from loader.train_data import DataError
    from loader.training_job import JobError, TrainJob
    settings = TrainSettings(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, eval_every=args.eval_every, seed=args.seed)
    targets = args.target_modules.split(",") if args.target_modules and args.target_modules != "all-linear" \
        else args.target_modules
    # Method-specific flags default to None here, so that one given at all (even at its default) is known.
    given = {name: getattr(args, name) for name in METHOD_SPECIFIC if getattr(args, name) is not None}
    if "heads" in given and given["heads"] != "auto":
        given["heads"] = _int_or(given["heads"])
    job = TrainJob(method=args.method, data=args.data, out=args.out, model=args.model, eval=args.eval,
                   alpha=args.alpha, dropout=args.dropout, target_modules=targets, max_length=args.max_length,
                   device=args.device, dtype=args.dtype, overwrite=args.overwrite, resume=args.resume,
                   settings=settings, **given)
    from loader.training_job import inapplicable
    if not args.jobs:  # with --jobs: the lines are checked as they are read, shared flags against all the jobs
        problem = inapplicable(job.method, set(given))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if bool(args.deploy_root) != bool(args.deploy):
        print("error: --deploy HOST:PORT and --deploy-root DIR go together: the server loads adapters only from its "
              "own --adapter-root, so a deploy copies the adapter there (DIR) and then has the server load it",
              file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"error: --threads must be >= 0 (0: torch's default), got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    progress = lambda steps: tqdm(steps, desc=f"train {args.method}", unit="step")  # noqa: E731
    if args.jobs:
        from loader.batch_jobs import gather_rows, read_jobs, run_jobs, summary_table
        try:
            jobs = read_jobs(Path(args.jobs), job)
            unused = [name for name in given if all(inapplicable(j.method, {name}) for j in jobs)]
            if unused:  # a shared flag no job's method uses would be silently ignored
                raise DataError(f"--{unused[0].replace('_', '-')} is given for the jobs, but no job's method uses "
                                f"it ({inapplicable(jobs[0].method, {unused[0]})})")
            _check_deploy(args, jobs)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rows = gather_rows(run_jobs(jobs, lambda j, progress: _train_one(j, args, progress), progress))
        if int(os.environ.get("RANK", 0)) == 0:  # one table for the whole run
            print(summary_table(rows))
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    try:
        _check_deploy(args, [job])
        _train_one(job, args, progress)
    except (JobError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _check_deploy(args, jobs) -> None:
    """With --deploy, before any training: the connection flags, the root, the server and every job's id."""
    if not args.deploy:
        return
    from loader.deploy import DeployError, check
    from loader.train_data import DataError
    connection = _connection(args)  # a wrong --token-file or --tls-* path: one line now, not after training
    try:
        limits = check(args.deploy, Path(args.deploy_root), [Path(job.out) for job in jobs], **connection).limits
    except DeployError as err:
        raise DataError(str(err)) from None
    from loader.training_job import slot_needs
    for job in jobs:
        width, heads = slot_needs(job) or (0, 0)
        if width > limits.max_lora_rank or heads > limits.max_hydra_heads:  # refused after training otherwise
            raise DataError(f"--out {job.out}: a {job.method} adapter of rank {job.rank}"
                            + (f" with {heads} heads" if job.method == "hydralora" else "")
                            + f" needs a slot {width} wide and {heads} head(s); {args.deploy} takes at most "
                              f"--max-lora-rank {limits.max_lora_rank} and --max-hydra-heads "
                              f"{limits.max_hydra_heads}")


METHOD_SPECIFIC = ("rank", "rslora", "heads", "router_bias", "init_r", "target_r", "tinit", "tfinal", "delta_t",
                   "orth_reg_weight", "structure", "pre_num")


def _int_or(text: str):
    """An int where the text is one, else the text (for the job's own check to name)."""
    try:
        return int(text)
    except ValueError:
        return text


def _train_one(job, args, progress) -> dict:
    from loader.training_job import run_job
    summary = run_job(job, progress=progress)
    last = summary["eval_loss"][-1][1] if summary["eval_loss"] else None
    print(f"{summary['out']}\t{job.method}\tsteps={summary['steps']}\ttrainable={summary['trainable_params']}"
          + (f"\teval_loss={last:.4f}" if last is not None else ""))
    if summary["merge_error"]:  # ResLoRA: what is served is the merged adapter, not the one the loss measured
        method = summary["merge_method"]
        error = summary["merge_error"][method]
        print(f"served merged into plain LoRA ({job.structure}, {method}): relative error {error:.3g} on the "
              f"{'eval' if job.eval else 'training'} data" + ("" if error < 0.01 else
              "; the served adapter is not the trained one: --structure bs merges exactly"))
    if args.deploy:
        from loader.deploy import DeployError, deploy
        from loader.training_job import JobError
        try:
            info, moved = deploy(Path(job.out), args.deploy, Path(args.deploy_root), **_connection(args))
        except DeployError as err:
            raise JobError(f"trained and saved to {job.out}, but not deployed: {err}") from None
        if moved is not None:
            print(f"kept the directory that was at {Path(args.deploy_root) / info.adapter_id} as {moved} "
                  f"(a deploy never deletes what it did not create)")
        print(f"deployed {info.adapter_id} (version {info.version}{', pinned' if info.pinned else ''}) to "
              f"{args.deploy}")
    return summary


def _merge(args) -> int:
    from loader.merge import merge_reslora
    from loader.train_data import DataError
    from loader.training_job import JobError
    from server.errors import LoraplexError
    try:
        report = merge_reslora(Path(args.adapter_dir), Path(args.out), args.model, args.eval, args.merge_method,
                               args.max_length, args.device)
    except (JobError, DataError, LoraplexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    error = report["merge_error"]
    print(f"wrote plain LoRA to {report['out']} ({report['structure']}, {report['merge_method']}); merge error on "
          f"eval data: {'not measured (no --eval)' if error is None else f'{error:.3e}'}")
    return 0


def _build_default(args) -> int:
    from dataclasses import replace

    from loader.builtin import BUILTIN_DIR, QUICK, BuildSettings, build
    if args.quick and not args.out:
        print(f"error: --quick builds a wiring check, not a usable model: give --out DIR (without it, it would "
              f"replace the shipped model in {BUILTIN_DIR})", file=sys.stderr)
        return 2
    settings = replace(QUICK if args.quick else BuildSettings(), seed=args.seed, device=args.device)
    report = build(Path(args.out) if args.out else BUILTIN_DIR, settings, args.adapters)
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


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that names each flag's default, where it has one to name (not None or a switch's False)."""

    def _get_help_string(self, action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from server.config import add_serve_arguments
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server",
                                     allow_abbrev=False)  # `--token SECRET` must not pass for --token-file
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", allow_abbrev=False, help="start the gRPC server",
                           formatter_class=_ShowDefaults)
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    def connection_args(p):
        p.add_argument("--token-file", default=None, help="file holding the bearer token (else $LORAPLEX_TOKEN)")
        p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
        p.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate (TLS)")
        p.add_argument("--tls-cert", default=None, help="PEM client certificate chain (mutual TLS)")
        p.add_argument("--tls-key", default=None, help="PEM client private key (mutual TLS)")

    def client_args(p):
        p.add_argument("--target", default=DEFAULT_TARGET,
                       help=f"server address host:port (default {DEFAULT_TARGET})")
        p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        connection_args(p)

    gen = sub.add_parser("generate", allow_abbrev=False, help="stream a completion to the terminal")
    client_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default="", help="adapter id ('' = base model)")
    gen.add_argument("--max-new-tokens", type=_ranged(-2 ** 31, 2 ** 31), default=None,
                     help="tokens to generate at most (default: the server's, within the room the prompt leaves)")
    gen.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    gen.add_argument("--top-k", type=_ranged(-2 ** 31, 2 ** 31), default=None, help="sample from the k likeliest")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of this mass")
    gen.add_argument("--seed", type=_ranged(0, 2 ** 64), default=None,
                     help="reproducible sampling, whatever else is in the batch")
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past end-of-sequence")
    gen.set_defaults(func=_generate)

    adapters = sub.add_parser("adapters", allow_abbrev=False, help="list, get, load or unload adapters")
    adapter_sub = adapters.add_subparsers(dest="action", required=True)
    for action in ("list", "get", "load", "unload"):
        p = adapter_sub.add_parser(action, allow_abbrev=False)
        client_args(p)
        if action != "list":
            p.add_argument("adapter_id")
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

    train = sub.add_parser("train", allow_abbrev=False, formatter_class=_ShowDefaults,
                           help="fine-tune an adapter (lora, adalora, hydralora, reslora) from JSONL")
    t = train.add_argument
    t("--method", choices=["lora", "adalora", "hydralora", "reslora"], help="required unless --jobs gives it")
    t("--model", default="default", help="local HF causal-LM directory, or 'default'")
    t("--data", help='JSONL: {"prompt", "completion"} (loss on the completion) or {"text"}')
    t("--eval", default=None, help="JSONL eval set: eval loss is reported every --eval-every steps")
    t("--out", help="adapter directory to write")
    t("--jobs", default=None, help="JSONL of jobs (method, data, out, overrides); under torchrun each rank "
                                   "takes its share")
    t("--deploy", default=None, metavar="HOST:PORT", help="make this running server load the trained adapter "
      "(with --deploy-root)")
    t("--deploy-root", default=None, metavar="DIR", help="with --deploy: the server's --adapter-root, where the "
      "adapter is copied for it to load (id: the --out directory's name)")
    connection_args(train)
    t("--rank", type=int, default=None, help="adapter rank (default 8; AdaLoRA's are --init-r/--target-r)")
    t("--alpha", type=float, default=16.0, help="scaling numerator: alpha/r (alpha/sqrt(r) with --rslora)")
    t("--dropout", type=float, default=0.0, help="dropout on the adapter's input")
    t("--target-modules", default=None, help="comma-separated module names, or all-linear (default: per method)")
    t("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r) (lora, hydralora)")
    t("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, warm-up then cosine)")
    t("--epochs", type=int, default=1, help="passes over --data (unless --max-steps)")
    t("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t("--batch-size", type=int, default=8, help="examples per micro-batch")
    t("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t("--max-length", type=int, default=256, help="tokens an example is cut to")
    t("--eval-every", type=int, default=50, help="steps between eval losses and checkpoints")
    t("--seed", type=int, default=0, help="initialisation, data order and dropout")
    t("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
      help="the frozen base model's dtype while training (the adapter is saved in float32)")
    t("--overwrite", action="store_true", help="replace an adapter already in --out")
    t("--resume", action="store_true", help="continue from the checkpoint in --out")
    t("--init-r", type=int, default=None, help="AdaLoRA initial rank (default 12)")
    t("--target-r", type=int, default=None, help="AdaLoRA target average rank (default 8)")
    t("--tinit", type=int, default=None, help="AdaLoRA warm-up steps before pruning (default 0)")
    t("--tfinal", type=int, default=None, help="AdaLoRA final steps at the target budget (default 0)")
    t("--delta-t", type=int, default=None, help="AdaLoRA steps between rank reallocations (default 1)")
    t("--orth-reg-weight", type=float, default=None, help="AdaLoRA orthogonal regulariser weight (default 0.5)")
    t("--heads", default=None, help="HydraLoRA B heads: a number, or auto (k-means over the prompts); default 4")
    t("--router-bias", action="store_true", default=None, help="HydraLoRA router with a bias")
    t("--structure", default=None, choices=["is", "bs", "ms"], help="ResLoRA shortcut structure (default bs)")
    t("--pre-num", type=int, default=None, help="ResLoRA: how many previous blocks a block links to (default 1)")
    train.set_defaults(func=_train)

    merge = sub.add_parser("merge", allow_abbrev=False,
                           help="write a ResLoRA adapter as a plain PEFT LoRA, measuring the merge error")
    merge.add_argument("adapter_dir")
    merge.add_argument("--out", required=True)
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
                         help="retrain only these demo adapters on the base model already built in --out")
    builder.set_defaults(func=_build_default)
    return parser


def _openmp_waits_passively() -> None:
    """Unless the environment says otherwise, torch's OpenMP threads sleep at a barrier instead of spinning.
    Spinning wins a few percent on an idle machine and loses several times over beside any other busy process
    (a trainer, a sidecar, a CPU quota): a spinning thread holds the core its partner needs to finish the parallel
    region. Measured in bench/RESULTS.md ("OpenMP waits"). Only takes effect before torch is first imported."""
    if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> None:
    _openmp_waits_passively()
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(1)

    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # `python -m clients.cli` (what torchrun runs: `torchrun ... -m clients.cli train`)
    main()

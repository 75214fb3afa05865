"""`loraplex train`: its flags and the run: one adapter or a --jobs file, checked before any training starts
(flags the method ignores, --out, the --deploy target), trained, and optionally deployed to a running server."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from clients.cli_flags import ShowDefaults, add_connection_arguments, connection


def add_train_parser(sub) -> None:
    from server.config import THREADS_PER_CPU
    train = sub.add_parser("train", allow_abbrev=False, formatter_class=ShowDefaults,
                           help="fine-tune an adapter (lora, adalora, hydralora, reslora) from JSONL")
    t = train.add_argument
    t("--method", choices=["lora", "adalora", "hydralora", "reslora"], help="required unless --jobs gives it")
    t("--model", default="default", help="local HF causal-LM directory, or 'default'")
    t("--data", help='JSONL: {"prompt", "completion"} (loss on the completion), {"text"}, or {"messages"} (a chat '
                     'through the model\'s chat template, loss on the assistant turns)')
    t("--eval", default=None, help="JSONL eval set: eval loss is reported every --eval-every steps")
    t("--out", help="adapter directory to write")
    t("--jobs", default=None, help="JSONL of jobs (method, data, out, overrides); under torchrun each rank "
                                   "takes its share")
    t("--deploy", default=None, metavar="HOST:PORT", help="make this running server load the trained adapter "
      "(with --deploy-root)")
    t("--deploy-root", default=None, metavar="DIR", help="with --deploy: the server's --adapter-root, where the "
      "adapter is copied for it to load (id: the --out directory's name)")
    add_connection_arguments(train)
    t("--rank", type=int, default=None, help="adapter rank (default 8; AdaLoRA's are --init-r/--target-r)")
    t("--alpha", type=float, default=16.0, help="scaling numerator: alpha/r (alpha/sqrt(r) with --rslora)")
    t("--dropout", type=float, default=0.0, help="dropout on the adapter's input")
    t("--target-modules", default=None, help="comma-separated module names (each matches a module or its dotted "
      "suffix), or all-linear (default: PEFT's for the architecture; HydraLoRA: the FFN)")
    t("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r) (lora, hydralora)")
    t("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, warm-up then cosine)")
    t("--epochs", type=int, default=1, help="passes over --data (unless --max-steps)")
    t("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t("--batch-size", type=int, default=8, help="examples per micro-batch")
    t("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (its loss: the mean over all "
                                                "their labelled tokens, as one batch of them)")
    t("--max-length", type=int, default=256, help="tokens an example is cut to (at most the model's context)")
    t("--eval-every", type=int, default=50, help="steps between eval losses and checkpoints")
    t("--seed", type=int, default=0, help="initialisation, data order and dropout")
    t("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t("--threads", type=int, default=0,
      help=f"torch CPU threads (0: torch's default; at most {THREADS_PER_CPU} per CPU)")
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
    train.set_defaults(func=run)


def run(args) -> int:
    """`loraplex train`: one adapter (--method/--data/--out) or a --jobs file, optionally deployed."""
    try:
        return _train_all(args)
    except KeyboardInterrupt:
        if args.jobs:  # each job's --out tells what --resume does with it (batch_jobs.resume_plan)
            advice = ("run the same command with --resume to go on: finished jobs are skipped, interrupted ones "
                      "continue from their last checkpoint (written every --eval-every steps), the others start")
        elif args.out and (Path(args.out) / "checkpoint.pt").exists():
            advice = (f"run the same command with --resume to continue from the last checkpoint in {args.out} "
                      f"(written every --eval-every steps)")
        else:
            advice = "no checkpoint was written yet (one is every --eval-every steps): run the same command again"
        print(f"\ninterrupted: {advice}", file=sys.stderr)
        return 130


def _train_all(args) -> int:
    from tqdm import tqdm

    if not args.jobs and not (args.method and args.data and args.out):
        print("error: --method, --data and --out are required (or --jobs)", file=sys.stderr)
        return 2

    from adapters.training import TrainSettings
    from loader.train_data import DataError
    from loader.train_job_spec import JobError, TrainJob, inapplicable, parse_targets
    settings = TrainSettings(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, eval_every=args.eval_every, seed=args.seed)
    try:
        targets = parse_targets(args.target_modules)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Method-specific flags default to None here, so that one given at all (even at its default) is known.
    given = {name: getattr(args, name) for name in METHOD_SPECIFIC if getattr(args, name) is not None}
    if "heads" in given and given["heads"] != "auto":
        given["heads"] = _int_or(given["heads"])
    job = TrainJob(method=args.method, data=args.data, out=args.out, model=args.model, eval=args.eval,
                   alpha=args.alpha, dropout=args.dropout, target_modules=targets, max_length=args.max_length,
                   device=args.device, dtype=args.dtype, overwrite=args.overwrite, resume=args.resume,
                   settings=settings, **given)
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
    from server.config import threads_problem
    problem = threads_problem(args.threads)  # serve's bound: thousands of threads crash the process
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    def progress(job):  # the bar names the job's own method and output (under --jobs, jobs differ)
        return lambda steps: tqdm(steps, desc=f"train {job.method} {Path(job.out).name}", unit="step")
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
        rows = gather_rows(run_jobs(jobs, lambda j: _train_one(j, args, progress(j)),
                                    lambda j: _deploy_pending(j, args)))
        if int(os.environ.get("RANK", 0)) == 0:  # one table for the whole run
            print(summary_table(rows))
        return 0 if all(r["status"] in ("ok", "skipped", "deployed") for r in rows) else 1
    try:
        _check_deploy(args, [job])
        from loader.batch_jobs import resume_plan
        if resume_plan(job) is None:  # --resume of a job done before: only a deploy it still lacks is left
            if not _deploy_pending(job, args):
                print(f"{job.out} holds this job's adapter already (and its deploy, where --deploy asks for one)")
            return 0
        _train_one(job, args, progress(job))
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
    flags = connection(args)  # a wrong --token-file or --tls-* path: one line now, not after training
    try:
        limits = check(args.deploy, Path(args.deploy_root), [Path(job.out) for job in jobs], **flags).limits
    except DeployError as err:
        raise DataError(str(err)) from None
    from loader.heads import MAX_AUTO_HEADS, MIN_AUTO_HEADS
    from loader.train_job_spec import slot_needs
    for job in jobs:
        width, heads = slot_needs(job) or (0, 0)
        if width > limits.max_lora_rank or heads > limits.max_hydra_heads:  # refused after training otherwise
            with_heads = f" with {heads} heads" if job.method == "hydralora" else ""
            if job.method == "hydralora" and job.heads == "auto":
                with_heads = f" with at least {heads} heads (--heads auto chooses {MIN_AUTO_HEADS} to {MAX_AUTO_HEADS})"
            raise DataError(f"--out {job.out}: a {job.method} adapter of rank {job.rank}{with_heads}"
                            + (f" (structure bs merges each block with its --pre-num {job.pre_num} predecessor(s))"
                               if job.method == "reslora" and job.structure == "bs" else "")
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
        _deploy_trained(job, args, summary)
    return summary


def _deploy_trained(job, args, summary: dict) -> None:
    """Deploy the adapter `job` trained (summary: its training_log.json), and record the deploy in that log: a
    --resume after a deploy that failed or was cut (a server restarting, Ctrl-C) deploys it then, instead of
    passing the job as done (see _deploy_pending)."""
    from loader.deploy import DeployError, deploy
    from loader.train_job_spec import LOG, JobError
    try:
        info, moved = deploy(Path(job.out), args.deploy, Path(args.deploy_root), expected=summary["served"],
                             **connection(args))
    except DeployError as err:
        then = ("once the server takes it (restarted with a larger limit, say); or retrain it with other settings "
                "(--overwrite)") if err.refused else "deploys it"
        raise JobError(f"trained and saved to {job.out}, but not deployed: {err}; the same command with --resume "
                       f"{then}") from None
    if moved is not None:
        print(f"kept the directory that was at {Path(args.deploy_root) / info.adapter_id} as {moved} "
              f"(a deploy never deletes what it did not create)")
    print(f"deployed {info.adapter_id} (version {info.version}{', pinned' if info.pinned else ''}) to {args.deploy}")
    log = Path(job.out) / LOG  # `summary` is what it holds (run_job wrote it, or _deploy_pending read it)
    (log.parent / (LOG + ".tmp")).write_text(json.dumps({**summary, "deployed": _deploy_key(args)}, indent=2))
    os.replace(log.parent / (LOG + ".tmp"), log)  # a Ctrl-C never leaves half a log (a resume reads it)


def _deploy_key(args) -> dict:
    return {"target": args.deploy, "root": str(Path(args.deploy_root).resolve())}


def _deploy_pending(job, args) -> bool:
    """For a job --resume passes as done: deploy its adapter if --deploy asks for a deploy its log does not record
    (to this target and root). True when it deployed now."""
    from loader.train_job_spec import LOG
    if not args.deploy:
        return False
    summary = json.loads((Path(job.out) / LOG).read_text())
    if summary.get("deployed") == _deploy_key(args):
        return False
    _deploy_trained(job, args, summary)
    return True

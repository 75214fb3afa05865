"""Batch training: `loraplex train --jobs jobs.jsonl`, one job per line (method, data, out, overrides).

Under torchrun each rank takes jobs[RANK::WORLD_SIZE] (adapters are independent: no DDP; the ranks meet once,
at the end, to report together); without torchrun the same command is rank 0 of 1. A failed job is reported and
the others still run, on every rank. With --resume, a job whose --out holds its finished adapter is skipped, one
with a checkpoint resumes and one with neither starts: the same command goes on after an interrupt.
"""
from __future__ import annotations

import json
import os
import traceback
from dataclasses import fields, replace
from pathlib import Path

from adapters.training import TrainSettings
from loader import json_input
from loader.peft_files import CONFIG_FILE
from loader.train_data import DataError, jsonl_lines
from loader.train_job_spec import (CHECKPOINT, LOG, METHODS, JobError, TrainJob, changes, check_job, inapplicable,
                                   job_identity, parse_targets)

JOB_FIELDS = {f.name for f in fields(TrainJob)} - {"settings"}
DEFAULTS = {f.name: f.default for f in fields(TrainJob) if f.name != "settings"}
SETTING_FIELDS = {f.name for f in fields(TrainSettings)}


def read_jobs(path: Path, defaults: TrainJob) -> list[TrainJob]:
    """Each line overrides `defaults` (the command line's flags); unknown keys are an error, with the line."""
    jobs = []
    for number, line in enumerate(jsonl_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json_input.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        unknown = set(record) - JOB_FIELDS - SETTING_FIELDS if isinstance(record, dict) else set()
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if unknown:
            raise DataError(f"{path}:{number}: unknown keys {sorted(unknown)}; allowed: "
                            f"{sorted(JOB_FIELDS | SETTING_FIELDS)}")
        missing = [k for k in ("method", "data", "out") if k not in record and getattr(defaults, k) is None]
        if missing:
            raise DataError(f"{path}:{number}: a job needs 'method', 'data' and 'out' (from the line or the "
                            f"command line); missing {missing}")
        method = record.get("method", defaults.method)
        if method not in METHODS:
            raise DataError(f"{path}:{number}: 'method' must be one of {list(METHODS)}, got {method!r}")
        problem = inapplicable(method,
                               {k for k, v in record.items() if k in DEFAULTS and v != DEFAULTS[k]})
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        if "target_modules" in record:  # the flag's syntax, as any other key's
            try:
                record["target_modules"] = parse_targets(record["target_modules"], "'target_modules'")
            except JobError as exc:
                raise DataError(f"{path}:{number}: {exc}") from None
        settings = replace(defaults.settings, **{k: v for k, v in record.items() if k in SETTING_FIELDS})
        job = replace(defaults, settings=settings, **{k: v for k, v in record.items() if k in JOB_FIELDS})
        try:  # every value's type and range now, not when the job's turn comes (or as a traceback)
            check_job(job)
        except JobError as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
        jobs.append(job)
    if not jobs:  # as an empty --data is: a run that trains nothing is no success to report
        raise DataError(f"{path}: no jobs (one JSON object a line, e.g. {{\"method\": \"lora\", \"data\": "
                        f"\"a.jsonl\", \"out\": \"out/a\"}})")
    outs = [Path(j.out).resolve() for j in jobs]
    for i, out in enumerate(outs):
        if out in outs[:i]:
            raise DataError(f"{path}: jobs {outs.index(out)} and {i} both write {jobs[i].out}; give each its own "
                            f"'out'")
    return jobs


def my_share(jobs: list[TrainJob]) -> tuple[int, int, list[tuple[int, TrainJob]]]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    mine = [(i, j) for i, j in enumerate(jobs) if i % world == rank]
    if world > 1:  # each rank's GPU jobs on its own GPU, whatever devices its other jobs use
        mine = [(i, replace(j, device=f"cuda:{local}") if j.device.startswith("cuda") else j) for i, j in mine]
    return rank, world, mine


def finished_job(out: Path) -> dict | None:
    """The identity of the job whose adapter `out` holds, from its training_log.json (written after the adapter,
    so a run interrupted before it is not finished), or None."""
    try:
        recorded = json_input.loads((out / LOG).read_text()).get("job") if (out / CONFIG_FILE).is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def resume_plan(job: TrainJob) -> TrainJob | None:
    """What --resume does to one job of a batch, where an interrupt leaves three kinds of --out: the adapter of
    this same job (None: skipped as done), a checkpoint (resumed), or neither (the job never started: started
    from the beginning). An adapter of another configuration is neither retrained nor passed as done."""
    out = Path(job.out)
    if not job.resume:
        return job
    recorded = finished_job(out)
    if recorded is not None:
        changed = changes(recorded, job_identity(job))
        if not changed:
            return None
        if not job.overwrite:
            raise JobError(f"{out} holds an adapter trained with another configuration ({', '.join(changed)}); "
                           f"pass --overwrite to train this job over it")
        # over it: from this job's checkpoint where an interrupt left one, else from the start (run_job tells)
    if not (out / CHECKPOINT).exists() and not (out / CONFIG_FILE).exists():
        return replace(job, resume=False)
    return job


def run_jobs(jobs: list[TrainJob], run, done=lambda job: False) -> list[dict]:
    """Run this rank's share; returns one row per job: index, method, out, status, steps, eval_loss, error.
    `done(job)` for a job --resume passes as done: True when it finished it now (a deploy that had not happened)."""
    _, _, mine = my_share(jobs)
    rows = []
    for index, job in mine:
        try:
            planned = resume_plan(job)
            if planned is None:
                status = "deployed" if done(job) else "skipped"
                rows.append({"job": index, "method": job.method, "out": job.out, "status": status})
                continue
            job = planned
            summary = run(job)
            eval_loss = summary["eval_loss"][-1][1] if summary["eval_loss"] else None
            rows.append({"job": index, "method": job.method, "out": job.out, "status": "ok",
                         "steps": summary["steps"], "eval_loss": eval_loss, "seconds": summary["seconds"]})
        except (JobError, DataError) as exc:
            rows.append({"job": index, "method": job.method, "out": job.out, "status": "failed", "error": str(exc)})
        except Exception as exc:  # a bug in one job must not stop the others; the traceback is printed
            traceback.print_exc()
            rows.append({"job": index, "method": job.method, "out": job.out, "status": "failed",
                         "error": f"{type(exc).__name__}: {exc}"})
    return rows


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows, once every rank has finished its share (by job index). torchrun stops all workers as
    soon as one exits non-zero, so a rank whose job failed must wait for the others before anyone exits; the
    only collective is this one, at the end (gloo, over the store torchrun already runs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return rows
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))  # the slowest rank may train for days
    try:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, rows)
    finally:
        dist.destroy_process_group()
    return sorted((row for part in everyone for row in part), key=lambda row: row["job"])


def summary_table(rows: list[dict]) -> str:
    lines = ["job  method     status   steps  eval_loss  seconds  out / error"]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        tail = {"ok": r["out"], "skipped": f"(done) {r['out']}: holds this job's adapter already",
                "deployed": f"(trained before) {r['out']}: deployed now"}.get(
            r["status"], f"{r['out']}: {r.get('error')}")
        lines.append(f"{r['job']:<4} {r['method']:<10} {r['status']:<8} {r.get('steps', '-')!s:<6} {loss:<10} "
                     f"{r.get('seconds', '-')!s:<8} {tail}")
    return "\n".join(lines)

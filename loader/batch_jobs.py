"""Batch training: `loraplex train --jobs jobs.jsonl`, one job per line (method, data, out, overrides).

Under torchrun each rank takes jobs[RANK::WORLD_SIZE] (adapters are independent: no DDP; the ranks meet once,
at the end, to report together); without torchrun the same command is rank 0 of 1. A failed job is reported and
the others still run, on every rank.
"""
from __future__ import annotations

import json
import os
import traceback
from dataclasses import fields, replace
from pathlib import Path

from adapters.training import TrainSettings
from loader.train_data import DataError, jsonl_lines
from loader.training_job import METHODS, JobError, TrainJob, inapplicable, parse_targets

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
            record = json.loads(line)
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
        jobs.append(replace(defaults, settings=settings, **{k: v for k, v in record.items() if k in JOB_FIELDS}))
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


def run_jobs(jobs: list[TrainJob], run, progress=None) -> list[dict]:
    """Run this rank's share; returns one row per job: index, method, out, status, steps, eval_loss, error."""
    _, _, mine = my_share(jobs)
    rows = []
    for index, job in mine:
        try:
            summary = run(job, progress=progress)
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
    lines = ["job  method     status  steps  eval_loss  seconds  out / error"]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        tail = r["out"] if r["status"] == "ok" else f"{r['out']}: {r['error']}"
        lines.append(f"{r['job']:<4} {r['method']:<10} {r['status']:<7} {r.get('steps', '-')!s:<6} {loss:<10} "
                     f"{r.get('seconds', '-')!s:<8} {tail}")
    return "\n".join(lines)

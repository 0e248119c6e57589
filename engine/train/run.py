"""Train a CLIP model: `python -m clipforge.train --config run.yaml` (one process) or
`deepspeed --num_gpus N --module clipforge.train --config run.yaml` (N ranks; gloo on CPU).

Also the `clipforge train` sub-command (`add_arguments` / `run`), and `main(argv)` for tests.
Each run writes into its output directory: config.yaml (the resolved config), deepspeed_config.json,
metrics.jsonl (one JSON object per step; with evaluation.zeroshot, zero-shot top-1 / top-5 / per-class
recall on the steps it runs: engine/train/zeroshot.py), tensorboard/, checkpoints/ (each step_N/ also readable by
`clipforge.load`), model.safetensors (the final weights, readable by `clipforge.load`) and loss_curve.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig
from .metrics import RunLog, plot_loss_curve, write_summary
from .distributed import init_distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Every run-config key, its type, default and meaning: docs/CONFIG.md, or print it with "
                     "python -m clipforge.train.config_reference.")
    parser.add_argument("--config", help="run config (YAML); omitted: the defaults (tiny CPU run)")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    parser.add_argument("--output-dir", default=None, help="override output_dir")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': continue from the newest complete checkpoint, if any; or a checkpoint path")
    parser.add_argument("--force", action="store_true",
                        help="start a fresh run in a used --output-dir: the earlier run's files are first moved "
                             "to <output-dir>.previous-<time>/ (never deleted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override any config key (repeatable), e.g. --set optimizer.lr=1e-4")
    # the deepspeed launcher passes --local_rank (LOCAL_RANK is also in the environment)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(argv=None) -> int:
    from ..cli import run_command

    return run_command("train", argv)


def build_config(args) -> TrainConfig:
    cfg = TrainConfig.load(args.config, args.set)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    cfg.check()
    return cfg


def run(args) -> int:
    from .preflight import preflight

    try:
        cfg = build_config(args)
        # the whole run resolved (model, shards, packages, folders) before DeepSpeed, the model or the data
        # start, and before anything is written: a run that cannot finish stops here, exit 2
        preflight(cfg, resume=args.resume, force=args.force)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"clipforge train: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, on every rank
        return 2
    init_distributed(timeout_s=cfg.distributed.timeout_s)  # registers the group's teardown at exit
    if not _take_folder(cfg, args.force, args.resume):
        return 2
    from .checkpoint import CheckpointError
    from .rundir import release
    from ..data.config import DataError

    from .distributed import announce_failure

    try:
        cfg.validate(dist.get_world_size())
        return train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, DataError) as exc:  # one sentence, no traceback
        # a failure of this rank alone (a file only it reads): the others hear of it and stop within ~1 s
        announce_failure(str(exc))
        print(f"clipforge train: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, DataError) else 2  # DataError: e.g. an epoch with no usable sample left
    finally:
        if dist.get_rank() == 0:
            release(cfg.output_dir)


def _take_folder(cfg: TrainConfig, force: bool, resume: str | None) -> bool:
    """Rank 0 moves an earlier run aside (--force) and takes the folder's lock; every rank learns the outcome."""
    from . import rundir

    failed = None
    if dist.get_rank() == 0:
        try:
            for note in rundir.prepare(cfg, force, resume):
                print(f"clipforge train: {note}", file=sys.stderr)
        except (ConfigError, OSError) as exc:
            failed = str(exc)
            print(f"clipforge train: {failed}", file=sys.stderr)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if failed is None else 1], device=device)
    dist.broadcast(flag, src=0)
    return not bool(flag.item())


# ---------------------------------------------------------------------------------- the run
def save(trainer, cfg: TrainConfig) -> str | None:
    """Write a checkpoint atomically (all ranks call this); returns its path on rank 0. Besides DeepSpeed's
    state and the trainer's, it holds the model (model.safetensors: fp32 weights + config), so that
    `clipforge.load` and `clipforge eval` open the checkpoint directory."""
    from . import checkpoint
    from ..model.weights import CheckpointError, save_state_dict

    directory = cfg.checkpoint_dir
    tmp = checkpoint.prepare_tmp(directory, trainer.step, trainer.rank)
    dist.barrier()
    error = None
    try:
        trainer.save_checkpoint(tmp)
        weights = trainer.full_state_dict(rank0_only=True)  # collective under ZeRO 3
        if trainer.rank == 0:
            save_state_dict(weights, trainer.model_config, checkpoint.model_path(tmp))
        del weights
    except Exception as exc:  # a full disk, mostly: nothing partial is left to fill it further
        error = checkpoint.write_failed(tmp, exc)
    # every rank learns whether every rank's part is on disk (a write that only rank 0 makes can fail
    # alone): all raise together instead of the others waiting in a barrier for a rank that gave up
    failed = torch.tensor([0 if error is None else trainer.rank + 1], device=trainer.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error from None
    if int(failed.item()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {tmp} failed on rank {int(failed.item()) - 1} (its message is "
                              "that rank's); the previous checkpoint is intact")
    final = None
    if trainer.rank == 0:
        final = checkpoint.finalize(directory, trainer.step, cfg.checkpointing.keep_last, cfg.output_dir)
    dist.barrier()
    return final


def train(cfg: TrainConfig, resume: str | None = None, grad_hook=None) -> int:
    """Run training to cfg.max_steps; returns the exit status (0 done, 1 stopped on non-finite losses).

    `grad_hook(trainer)`, if given, runs every step between the last backward and the optimizer step
    (see `Trainer.grad_hook`). SIGTERM / SIGINT on any rank: every rank checkpoints after its step and the
    run returns 143 / 130 (128 + the signal; engine/train/signals.py)."""
    from .signals import StopOnSignal

    stop = StopOnSignal().install()  # from here a SIGTERM / SIGINT asks for a checkpoint and a stop
    try:
        return _train(cfg, resume, grad_hook, stop)
    finally:
        stop.close()


def _train(cfg: TrainConfig, resume, grad_hook, stop) -> int:
    from . import checkpoint, zeroshot
    from ..model.weights import save_state_dict
    from .signals import exit_code, release_shm, signal_name
    from .trainer import NonFiniteLossError, Trainer

    rank = dist.get_rank()
    started = time.time()
    # rank 0 resolves the checkpoint (its run id is in rank 0's output folder, which may be node-local)
    found = [checkpoint.resolve_resume(resume, cfg.checkpoint_dir, cfg.output_dir) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    resume_path = found[0]
    trainer = Trainer(cfg)
    trainer.grad_hook = grad_hook
    if resume_path is not None:
        trainer.load_checkpoint(resume_path)
    if rank == 0:  # only once the run stands (a resume that fails leaves the folder as it was)
        from .rundir import set_run_id

        os.makedirs(cfg.output_dir, exist_ok=True)
        set_run_id(cfg, resume, resume_path)
        _write_resolved_config(cfg, dist.get_world_size())
    dist.barrier()
    first_step, first_samples, written = trainer.step, trainer.samples_seen, []
    log = RunLog(cfg, trainer.step, enabled=rank == 0)
    if resume_path is not None:
        log.message(f"resumed from {resume_path} at step {trainer.step}")
    elif resume == "auto":
        log.message(f"--resume auto: no complete checkpoint in {cfg.checkpoint_dir}, starting fresh")
    last_saved = trainer.step if resume_path is not None else None
    last_path, status, stopped = resume_path, 0, 0
    last_zeroshot = None  # the latest zero-shot report (rank 0), for summary.json
    try:
        while trainer.step < cfg.max_steps:
            stopped = stop.agreed(trainer.device)  # collective: did any rank get SIGTERM / SIGINT?
            if stopped:
                break
            metrics = trainer.train_step()
            every = cfg.evaluation.every_steps
            if every and trainer.step % every == 0:
                metrics.update(trainer.evaluate())
            if zeroshot.due(cfg, trainer.step):  # collective; the report on rank 0
                last_zeroshot = zeroshot.evaluate(trainer)
                if last_zeroshot is not None:
                    metrics.update(zeroshot.metrics(last_zeroshot))
            log.write(metrics)
            every = cfg.checkpointing.every_steps
            if every and trainer.step % every == 0:
                last_path = save(trainer, cfg)
                last_saved = trainer.step
                written.append(last_path)
    except NonFiniteLossError as exc:
        if rank == 0:
            print(f"clipforge train: stopped at step {trainer.step}: {exc}", file=sys.stderr)
        status = 1
    finally:
        log.close()
    if stopped:  # a checkpoint of this step on every rank (unless the last one is), the shm released, 128 + signal
        if last_saved != trainer.step and trainer.step > 0:
            last_path = save(trainer, cfg)
            written.append(last_path)
        report = trainer.data_report()  # collective
        if rank == 0:
            _summary(cfg, trainer, exit_code(stopped), started, first_step, first_samples, resume_path, written,
                     report, last_zeroshot)
        release_shm()
        if rank == 0:
            why = stop.reason if stop.signum else f"{signal_name(stopped)} on another rank"
            where = f"checkpoint {last_path}" if last_path else "no checkpoint (no step trained)"
            print(f"clipforge train: {why}: stopped at step {trainer.step}, {where}; continue with --resume auto "
                  f"(exit {exit_code(stopped)})", file=sys.stderr)
        dist.barrier()  # no rank exits (and makes the launcher kill the others) before rank 0 has written
        return exit_code(stopped)
    if status == 0 and cfg.checkpointing.save_final and last_saved != trainer.step:
        written.append(save(trainer, cfg))
    report = trainer.data_report()  # collective
    if rank == 0 and report is not None:
        _report_data(report, cfg.output_dir)
    weights = trainer.full_state_dict(rank0_only=True)  # collective under ZeRO 3
    if rank == 0:
        model_path = os.path.join(cfg.output_dir, "model.safetensors")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if status != 0 or bad:
            # a run that stopped on non-finite losses (or holds non-finite weights) writes no model: an
            # earlier model.safetensors, and the last good checkpoint, stay what `load` opens
            why = f"non-finite weights in {', '.join(sorted(bad)[:3])}" if bad else "it stopped on non-finite losses"
            print(f"clipforge train: no model.safetensors written ({why}); the last checkpoint in "
                  f"{cfg.checkpoint_dir} is the model to resume or export", file=sys.stderr)
            status = status or 1
        else:
            save_state_dict(weights, trainer.model_config, model_path)
        if cfg.logging.plot and os.path.exists(log.path):
            plot_loss_curve(log.path, os.path.join(cfg.output_dir, "loss_curve.png"))
        _summary(cfg, trainer, status, started, first_step, first_samples, resume_path, written, report,
                 last_zeroshot)
    dist.barrier()
    return status


def _summary(cfg, trainer, status, started, first_step, first_samples, resume_path, written, report,
             last_zeroshot=None) -> None:
    """summary.json and its line: what this run did (engine/train/metrics.py: write_summary); with
    evaluation.zeroshot, its latest report ("zeroshot": `clipforge eval`'s keys plus "step"; null if none ran)."""
    wall = time.time() - started
    samples = trainer.samples_seen - first_samples
    summary = {
        "status": status, "step": trainer.step, "steps_run": trainer.step - first_step, "resumed_from": resume_path,
        "samples_seen": trainer.samples_seen, "samples_this_run": samples, "wall_s": round(wall, 3),
        "samples_per_s": round(samples / wall, 3) if wall > 0 else 0.0,
        "nonfinite_steps_skipped": trainer.nonfinite_total, "checkpoints_written": [p for p in written if p],
        "data": report}
    if cfg.evaluation.zeroshot.path:
        summary["zeroshot"] = last_zeroshot
    write_summary(cfg.output_dir, summary)


def _report_data(report: dict, output_dir: str) -> None:
    """data_stats.json, and one line on stderr when any sample was skipped, replaced or lost."""
    with open(os.path.join(output_dir, "data_stats.json"), "w") as f:
        json.dump(report, f, indent=1)
    parts = [f"{name} {dict(report[name])}" for name in ("skipped", "skipped_at_make_shards", "runtime")
             if report.get(name)]
    if report.get("vanished"):
        parts.append(f"shards gone from disk: {', '.join(report['vanished'])}")
    if parts:
        print(f"clipforge train: data: {'; '.join(parts)} (run-time counts summed over ranks; "
              f"{os.path.join(output_dir, 'data_stats.json')})", file=sys.stderr)


def _write_resolved_config(cfg: TrainConfig, world_size: int) -> None:
    import yaml

    for name, write in (("config.yaml", lambda f: yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f,
                                                                   sort_keys=False)),
                        ("deepspeed_config.json", lambda f: json.dump(cfg.deepspeed_config(world_size), f, indent=2))):
        path = os.path.join(cfg.output_dir, name)
        with open(path + ".tmp", "w") as f:
            write(f)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())

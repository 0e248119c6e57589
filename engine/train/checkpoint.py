"""Training checkpoints: a DeepSpeed checkpoint plus the trainer's own state, written atomically.

Layout of a checkpoint directory `<dir>/step_000123/` (the file names are model/weights.py's, which
reads them: `clipforge.load(<dir>/step_000123)` and `clipforge eval --model <dir>/step_000123`):
    ds/                      DeepSpeed's files (model, ZeRO partitions, optimizer, LR schedule)
    trainer_rank{r}.pt       each rank's trainer state: step, samples seen, data position, RNG states
    model.safetensors        the full weights in fp32 with the model config (as the run's final
                             model.safetensors): what `clipforge.load` reads of a checkpoint
    COMPLETE                 written last: the step, then every file with its size; a directory without
                             it is never resumed from nor loaded, and one whose files differ from that
                             list (cut short by a full disk, lost) is skipped by --resume auto for the
                             newest intact one, with a warning

model.safetensors costs one fp32 copy of the weights per checkpoint, beside DeepSpeed's files (weights,
fp32 master copy and Adam's two moments): 4 bytes a parameter, e.g. ~10 GB for ViT-bigG-14 (2.5 B
parameters) beside DeepSpeed's ~35 GB, times `keep_last`; rank 0 gathers it (a collective under ZeRO 3)
and holds it in CPU memory while writing. Checkpoints written before it existed load from
ds/mp_rank_00_model_states.pt given a model name (ZeRO 0-2 only: ZeRO 3 partitions the weights across ranks).

Atomicity: every rank writes into `<dir>/.tmp-step_000123/`; after a barrier rank 0 writes COMPLETE and
renames the directory to its final name (a rename within one directory is atomic on POSIX file
systems). A crash mid-write therefore leaves a `.tmp-*` directory that `find_latest` ignores (and the
next save removes), and the previous checkpoint stays intact. Only the last `keep_last` are kept.
As for DeepSpeed's own checkpoints, the directory must be on a file system every rank sees.

The trainer state is plain tensors, numbers and lists, saved with torch.save and read back with
`torch.load(weights_only=True)`: loading it never runs pickled code.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from ..model import weights
from ..model.weights import CheckpointError, cause, is_complete, list_complete

# the file names of a checkpoint, and the completeness test, are model/weights.py's (it reads checkpoints too)
COMPLETE, MODEL_FILE, DS_TAG = weights.COMPLETE, weights.MODEL_FILE, weights.DS_TAG


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def tmp_path(directory: str, step: int) -> str:
    return os.path.join(directory, f".tmp-{checkpoint_name(step)}")


def trainer_state_path(path: str, rank: int) -> str:
    return os.path.join(path, f"trainer_rank{rank}.pt")


def model_path(path: str) -> str:
    """The checkpoint's model.safetensors (weights + config, what `clipforge.load` reads)."""
    return os.path.join(path, MODEL_FILE)


def _manifest(path: str) -> list[tuple[int, str]]:
    """(size, relative path) of every file of a checkpoint being finalized."""
    out = []
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            out.append((os.path.getsize(full), os.path.relpath(full, path)))
    return sorted(out, key=lambda e: e[1])


def damage(path: str) -> str | None:
    """Why a complete checkpoint cannot be resumed from, or None: COMPLETE lists every file with its size
    (a file cut short by a full disk, or lost, shows here without reading the checkpoint)."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return f"its {COMPLETE} marker cannot be read ({exc.strerror or exc})"
    listed = [line.split(" ", 1) for line in lines[1:] if line.strip()]
    if not listed and not os.path.isfile(trainer_state_path(path, 0)):  # a marker of before the listing
        return f"it holds no {os.path.basename(trainer_state_path(path, 0))}"
    for size, rel in listed:
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != int(size):
            return f"{rel} holds {os.path.getsize(full):,} bytes, {int(size):,} were written"
    return None


RUN = "RUN"  # a checkpoint's run: {"run_id", "output_dir"} of the run that wrote it
RUN_ID = "run_id"  # the run folder's id (train/rundir.py writes it when a run starts fresh)


def run_of(path: str) -> dict | None:
    """The run that wrote checkpoint `path` ({"run_id", "output_dir"}), None for one of before run ids."""
    try:
        with open(os.path.join(path, RUN)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def folder_run_id(output_dir: str) -> str | None:
    try:
        with open(os.path.join(output_dir, RUN_ID)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_latest(directory: str, run_id: str | None = None) -> str | None:
    """The newest intact complete checkpoint in `directory` (of run `run_id` when given: checkpoints of
    other runs are passed over), or None; a damaged one is skipped with a warning naming what is wrong."""
    import warnings

    for _, path in reversed(list_complete(directory)):
        run = run_of(path)
        if run_id is not None and run is not None and run.get("run_id") != run_id:
            continue
        why = damage(path)
        if why is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({why}); skipping it for the newest intact one",
                      RuntimeWarning, stacklevel=2)
    return None


def resolve_resume(resume: str | None, directory: str, output_dir: str | None = None) -> str | None:
    """`--resume auto` -> the newest intact complete checkpoint of this folder's run (None to start fresh;
    checkpoints of another run are refused, never continued); a path -> that checkpoint, whichever run."""
    if not resume:
        return None
    if resume == "auto":
        own = folder_run_id(output_dir) if output_dir else None
        latest = find_latest(directory, own or "")
        mine = [p for _, p in list_complete(directory) if (run_of(p) or {}).get("run_id") in (None, own or None)]
        if latest is None and mine:  # never a silent restart from step 0 of a run that has checkpoints
            raise CheckpointError(f"--resume auto: every complete checkpoint of this run in {directory} is damaged "
                                  f"({len(mine)}, newest {mine[-1]}: {damage(mine[-1])}); pass --resume PATH of one "
                                  "you trust, or --force to start the run afresh (the old files are kept aside)")
        if latest is None and output_dir is not None:
            others = [p for _, p in list_complete(directory) if (run_of(p) or {}).get("run_id") not in (None, own)]
            if others:
                run = run_of(others[-1])
                raise CheckpointError(
                    f"--resume auto: the checkpoints in {directory} were written by another run (run {run['run_id']} "
                    f"of {run.get('output_dir')}), not by the run of {output_dir}; continue it in its own folder, "
                    f"pass --resume {others[-1]} to adopt it here, or choose another checkpointing.dir")
        return latest
    path = resume
    if os.path.isdir(path) and not is_complete(path):
        # a checkpoint directory given by path must be complete; a parent directory means "its newest"
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(
                f"--resume {path}: neither a complete checkpoint (no {COMPLETE} marker: its write was "
                "interrupted) nor a directory holding one; pass another checkpoint or --resume auto"
            )
        return latest
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    why = damage(path)
    if why is not None:
        raise CheckpointError(f"--resume {path}: this checkpoint is damaged ({why}); pass an earlier one, or "
                              "--resume auto for the newest intact one")
    return path


def prepare_tmp(directory: str, step: int, rank: int) -> str:
    """Rank 0 clears a stale temp dir of the same step; every rank gets its path (call barrier after)."""
    path = tmp_path(directory, step)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
    return path


def write_failed(tmp: str, exc: Exception) -> CheckpointError:
    """The one sentence of a checkpoint write that failed (a full disk, mostly: DeepSpeed's torch.save
    reports it as "unexpected pos ..."); the partial temporary checkpoint is removed first."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(os.path.dirname(tmp)).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"writing checkpoint {tmp} failed ({cause(exc)}; {free}: a full disk?); "
                           "its partial files were removed and the previous checkpoint is intact: free space, then "
                           "continue with --resume auto")


def save_trainer_state(path: str, rank: int, state: dict) -> None:
    target = trainer_state_path(path, rank)
    torch.save(state, target + ".part")
    os.replace(target + ".part", target)


def load_trainer_state(path: str, rank: int) -> dict:
    target = trainer_state_path(path, rank)
    if not os.path.isfile(target):
        raise CheckpointError(
            f"{path} has no trainer state for rank {rank} ({os.path.basename(target)}): it was written by a run "
            "with fewer ranks; resume with the same number of ranks"
        )
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated (a full disk), empty, or a pickle that would need code to load
        raise CheckpointError(f"{target} cannot be read ({cause(exc, target)}): this checkpoint is "
                              "damaged; resume from an earlier one (pass its path to --resume)") from None


def finalize(directory: str, step: int, keep_last: int, output_dir: str | None = None) -> str:
    """Rank 0 only, after every rank has written: mark complete, rename into place, prune old ones (of
    this run only: another run's checkpoints in the folder are not this run's to delete)."""
    src = tmp_path(directory, step)
    dst = os.path.join(directory, checkpoint_name(step))
    run_id = folder_run_id(output_dir) if output_dir else None
    if run_id is not None:
        with open(os.path.join(src, RUN), "w") as f:
            json.dump({"run_id": run_id, "output_dir": os.path.abspath(output_dir)}, f)
    listing = "".join(f"{size} {rel}\n" for size, rel in _manifest(src))
    with open(os.path.join(src, COMPLETE), "w") as f:
        f.write(f"{step}\n{listing}")  # the step, then every file with its size (see `damage`)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(dst):  # the same step saved twice (e.g. final save right after a periodic one)
        shutil.rmtree(dst)
    os.rename(src, dst)
    mine = [(s, p) for s, p in list_complete(directory) if (run_of(p) or {}).get("run_id") == run_id]
    # the run went back (--resume of an older checkpoint): its later checkpoints are another timeline now,
    # set aside (renamed, never deleted) so that --resume auto cannot jump to them
    for s, p in mine:
        if s > step:
            os.rename(p, os.path.join(directory, f"abandoned-{os.path.basename(p)}-{int(time.time())}"))
    older = [p for s, p in mine if s < step]
    for old in older[:max(0, len(older) - (keep_last - 1))]:  # this one and the keep_last - 1 newest before it
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(directory):  # leftovers of interrupted writes of earlier steps
        if name.startswith(".tmp-") and name != os.path.basename(src):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return dst

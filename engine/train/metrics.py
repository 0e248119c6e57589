"""What a run writes as it goes: metrics.jsonl, TensorBoard, the progress bar, the loss plot, summary.json."""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

from .config import TrainConfig


# --------------------------------------------------------------------------------- logging
def read_complete_records(path: str) -> list[str]:
    """The lines of metrics.jsonl up to its last complete record. A write cut short (a full disk, a
    killed process) leaves a partial last line: it is dropped with a warning, and so is anything after
    the first line that is not a JSON record, so that a resume never stops on a torn log."""
    kept = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except (UnicodeDecodeError, ValueError):
            dropped = sum(1 for r in lines[number - 1:] if r.strip())
            warnings.warn(f"{path}: line {number} is not a complete record (a write cut short?); it and the "
                          f"{dropped - 1} line(s) after it are dropped, the log continues from step "
                          f"{json.loads(kept[-1])['step'] if kept else 0}", RuntimeWarning, stacklevel=3)
            break
        kept.append(raw.decode("utf-8") + "\n")
    return kept


ZEROSHOT_SCALARS = ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall")  # TensorBoard's of a result


class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar; only rank 0 writes."""

    def __init__(self, cfg: TrainConfig, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.writer = self.bar = self.file = None
        if not enabled:
            return
        # a resumed run replays the steps after its checkpoint: drop their old lines
        kept = read_complete_records(self.path) if start_step > 0 and os.path.exists(self.path) else []
        kept = [line for line in kept if json.loads(line)["step"] <= start_step]
        tmp = self.path + ".tmp"  # rewritten whole, then renamed: a crash here leaves the old log as it was
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"), purge_step=start_step + 1)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        if self.writer is not None:
            for key, value in metrics.items():
                if key.startswith("zeroshot_"):  # zeroshot/top1, zeroshot/top5, zeroshot/mean_per_class_recall
                    if key in ZEROSHOT_SCALARS and value is not None:
                        self.writer.add_scalar(f"zeroshot/{key[len('zeroshot_'):]}", value, step)
                elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)
        if self.bar is not None:
            loss = metrics["loss"]
            post = {
                "samples/s": f"{metrics['samples_per_s']:.0f}",
                "loss": "skipped" if loss is None else f"{loss:.4f}",
                "lr": f"{metrics['lr']:.2e}",
                "scale": f"{metrics['logit_scale']:.2f}",
            }
            if metrics.get("loss_scale") is not None:
                post["loss_scale"] = f"{metrics['loss_scale']:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        for item in (self.bar, self.writer, self.file):
            if item is not None:
                item.close()


def plot_loss_curve(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("loss") is not None:
                steps.append(row["step"])
                losses.append(row["loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------- the run's summary
def write_summary(output_dir: str, summary: dict) -> str:
    """summary.json in the run folder (written whole, then renamed) and its headline on stderr: steps,
    samples, wall time, throughput, skipped non-finite steps, checkpoints, the data's skip counts by
    reason and by shard (validation) and at run time (summed over ranks), and the latest zero-shot result."""
    path = os.path.join(output_dir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    data = summary.get("data") or {}
    skipped = sum((data.get("skipped") or {}).values()) + sum((data.get("runtime") or {}).get(k, 0)
                                                              for k in ("read_error", "decode_error"))
    parts = [f"{summary['steps_run']} steps (to step {summary['step']})", f"{summary['samples_seen']:,} samples",
             f"{summary['wall_s']:.1f} s", f"{summary['samples_per_s']:.1f} samples/s",
             f"{summary['nonfinite_steps_skipped']} non-finite steps skipped",
             f"{len(summary['checkpoints_written'])} checkpoints written"]
    if summary.get("zeroshot"):
        zs = summary["zeroshot"]
        parts.append(f"zero-shot top-1 {zs['top1']:.1%} / top-5 {zs['top5']:.1%} at step {zs['step']}")
    if data:
        parts.append(f"{skipped} samples skipped" + (f" ({', '.join(f'{k} {v}' for k, v in data['skipped'].items())})"
                                                     if data.get("skipped") else ""))
    print(f"clipforge train: {', '.join(parts)}; {path}", file=sys.stderr)
    return path

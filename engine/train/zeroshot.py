"""Zero-shot classification during training (`evaluation.zeroshot`), as OpenCLIP's --zeroshot-frequency
but on any labelled folder or labelled shards, with `clipforge eval --task zeroshot`'s own code.

    evaluation:
      zeroshot:
        path: data/digits/val     # what `clipforge eval --task zeroshot --data` takes
        classes: null             # null: the folder names ("_" read as spaces); or a file, "a,b,c", a list
        templates: digits         # a template set of clipforge.serve.prompts, a JSON file, or a list
        every_steps: 100          # 0: only at the end of the run (which is always evaluated)
        batch_size: 64

Every rank embeds its share of the images: the batches b with b % world == rank of the pass `clipforge
eval` makes (`clipforge.serve.datasets.embed_labelled_part`), so each batch holds the same images as
there and each image gets the same embedding. Rank 0 gathers the shares, puts them back in order
(`merge_labelled`) and scores them with `clipforge.serve.evaluate.zeroshot_report`, the function
`clipforge eval` reports with: the classifier from the class names x templates (ensembled), top-1,
top-5, per-class recall. The numbers are those of `clipforge eval` on the checkpoint of that step, on
one process or W ranks (tests/test_train_zeroshot.py).

The model is the DeepSpeed engine's module, in eval mode under torch.no_grad(), every rank taking part:
under ZeRO 3 each sub-module's forward gathers its partitioned weights (DeepSpeed's hooks), the model's
own few top-level tensors (text projection, positional embedding, logit scale) are gathered for the
evaluation, every rank encodes the classifier's prompts and as many image batches as the busiest rank
(one-image stand-ins where it has none left, or a batch had no readable image), so that every rank runs
the same gathers in the same order. Under ZeRO 0-2
only rank 0 builds the classifier. Train mode is restored after, also on an error.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

# the metrics.jsonl keys of a result (prefixed "zeroshot_"): the report's names
LOGGED = {"top1": "top1", "top5": "top5", "mean_per_class_recall": "mean_per_class_recall",
          "per_class_recall": "per_class_accuracy", "images": "images"}


def due(cfg, step: int) -> bool:
    """Whether the run evaluates zero-shot after `step`: every `every_steps`, and at the last step."""
    zs = cfg.evaluation.zeroshot
    if not zs.path:
        return False
    return step == cfg.max_steps or bool(zs.every_steps and step % zs.every_steps == 0)


def evaluate(trainer) -> dict | None:
    """The zero-shot report of the trainer's current model (`zeroshot_report`'s, keys as `clipforge eval`
    writes them, plus "step") on rank 0, None on the others. A collective: every rank calls it."""
    from ..serve.datasets import _classnames_for, embed_labelled_part, merge_labelled
    from ..serve.embed import logit_scale
    from ..serve.evaluate import zeroshot_report
    from ..serve.prompts import get_templates
    from .distributed import failures_announced

    zs = trainer.cfg.evaluation.zeroshot
    rank, world = trainer.rank, trainer.world_size
    module = trainer.module
    zero3 = getattr(trainer, "zero_stage", 0) == 3
    templates = get_templates(zs.templates)
    with failures_announced():  # an error on one rank stops the others instead of leaving them in a gather
        trainer.engine.eval()
        try:
            with torch.no_grad(), _top_level_gathered(module, zero3):
                part = embed_labelled_part(module, zs.path, rank=rank, world=world, batch_size=zs.batch_size,
                                           device=trainer.device, progress=False)
                if world > 1:
                    _even_out_forwards(module, part, world, trainer.device)
                clf = scale = None
                if rank == 0 or zero3:  # under ZeRO 3 every rank runs the text tower's gathers
                    names = _classnames_for(part.folders, zs.classes, None, zs.path)
                    clf = module.zero_shot_classifier(names, templates, device=trainer.device, progress=False)
                    scale = logit_scale(module)
        finally:
            trainer.engine.train()
        parts = [part]
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(part, parts, dst=0, group=trainer.group)
        if rank != 0:
            return None
        emb, labels, folders, _, skipped = merge_labelled(parts)
        report = zeroshot_report(module, zs.path, emb, labels, folders, skipped, zs.classes, templates,
                                 classifier=clf, scale=scale)
    return {"step": trainer.step, **report}


def metrics(report: dict) -> dict:
    """The keys a result adds to its step's metrics.jsonl record: zeroshot_top1, zeroshot_top5,
    zeroshot_mean_per_class_recall, zeroshot_per_class_recall ({class: recall}), zeroshot_images,
    zeroshot_skipped (images that could not be read)."""
    out = {f"zeroshot_{key}": report[name] for key, name in LOGGED.items()}
    out["zeroshot_skipped"] = len(report["skipped"])
    return out


@contextlib.contextmanager
def _top_level_gathered(module, zero3: bool):
    """Under ZeRO 3: the model's own (top-level) parameters gathered, which its encode_text and the logit
    scale read outside any sub-module's forward (where DeepSpeed's hooks gather)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False))):
        yield


def _even_out_forwards(module, part, world: int, device) -> None:
    """Encode one-image stand-ins until this rank has run as many image batches as the busiest rank has
    batches, ceil(batches / world): under ZeRO 3 the i-th forward of every rank gathers the same weights
    together. Known on every rank without asking the others (each has listed or read the whole data set),
    since a rank still in its last batch cannot answer."""
    size = module.image_size
    for _ in range(-(-part.batches // world) - part.forwards):
        module.encode_image(torch.zeros(1, 3, size, size, device=device))

"""`clipforge embed`, `clipforge zeroshot`, `clipforge eval`: the serving and evaluation commands.

    clipforge embed --model CKPT (--images DIR | --texts FILE) --out FILE.npy [--index FILE.csv]
    clipforge zeroshot --model CKPT --images DIR --classes FILE|a,b,c --out predictions.csv
    clipforge eval --model CKPT --task zeroshot --data DIR --out report.json [--confusion cm.png]
    clipforge eval --model CKPT --task retrieval --data captions.csv --out report.json
    clipforge eval --model CKPT --task linear-probe --train DIR --test DIR --out report.json

CKPT is a weights file, a training checkpoint directory (<output_dir>/checkpoints/step_000123: an
intermediate checkpoint evaluates as the final model does) or a run's output directory.
Each command builds its configuration from the options and calls `clipforge.serve.embed` / `clipforge.serve.evaluate`.
User errors (bad checkpoint, missing folder, bad class list) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys


DESCRIPTIONS = {
    "embed": "Embed a folder of images or a file of texts (one per line) into an .npy array of L2-normalised "
             "float32 rows, plus an index CSV (row,source). Large inputs stream through a memory map; an "
             "interrupted run leaves <out>.progress.json and the same command resumes it.",
    "zeroshot": "Zero-shot classify every image below a folder against class names (prompt ensemble) and "
                "write a predictions CSV: path, top prediction, its probability, and the top-k.",
    "eval": "Evaluate a checkpoint: zero-shot top-1/top-5 on a labelled folder or webdataset (with a "
            "confusion-matrix PNG), image-text retrieval recall@K on a captioned set, or a linear probe "
            "(L-BFGS logistic regression, regularisation searched on a validation split). Writes a JSON report.",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="CKPT",
                   help="checkpoint: a clipforge .safetensors, an OpenAI .pt archive or an OpenCLIP state dict, "
                        "or a directory: a training checkpoint (<output_dir>/checkpoints/step_N) or a training "
                        "run's output directory (its final model.safetensors)")
    p.add_argument("--model-name", default=None, metavar="PRESET",
                   help="architecture, with OpenCLIP's names: ViT-B-32 is GELU (LAION / DataComp weights), "
                        "ViT-B-32-quickgelu QuickGELU (OpenAI's weights saved as a state dict); needed for a plain "
                        "state dict, which does not say its activation or heads (clipforge files and OpenAI's .pt "
                        "archives need none)")
    p.add_argument("--batch-size", type=int, default=64, help="images (or texts) per forward pass (default 64)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:1 (default: CUDA when available, else CPU)")
    p.add_argument("--no-amp", action="store_true", help="disable autocast (bf16/fp16) on CUDA")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: only for long inputs)")


def _templates(p: argparse.ArgumentParser) -> None:
    from .prompts import template_sets

    p.add_argument("--templates", default="imagenet", metavar="SET|FILE|TEMPLATE",
                   help=f"prompt templates: a shipped set ({', '.join(template_sets())}; default imagenet, the "
                        "paper's 80), a JSON file with a list of templates, or one template with {} "
                        "(e.g. 'a photo of a {}.')")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = DESCRIPTIONS[name]
    _common(parser)
    if name == "embed":
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--images", metavar="DIR", help="folder of images, searched recursively in sorted order")
        src.add_argument("--texts", metavar="FILE", help="text file, one text per line (blank lines are skipped)")
        parser.add_argument("--out", required=True, metavar="FILE.npy", help="output array (rows, embed_dim) float32")
        parser.add_argument("--index", default=None, metavar="FILE.csv",
                            help="index CSV with columns row,source (image path relative to --images, or the text); "
                                 "default <out stem>.index.csv")
        parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                            help="unreadable image: skip it and list it in the summary (default) or stop with an error")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing output (and discard an unfinished run's progress)")
        parser.add_argument("--stop-after-batches", type=int, default=None, metavar="N",
                            help="stop after N batches, leaving a resumable partial run (for time-boxed jobs)")
    elif name == "zeroshot":
        parser.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
        parser.add_argument("--classes", required=True, metavar="FILE|A,B,C",
                            help="class names: a text file with one per line, a JSON list, or a comma-separated list")
        _templates(parser)
        parser.add_argument("--out", required=True, metavar="FILE.csv",
                            help="predictions CSV: path,prediction,probability,top<k>_class...,top<k>_prob...")
        parser.add_argument("--topk", type=int, default=5, help="how many ranked classes per image in the CSV (default 5)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (refused otherwise)")
    elif name == "eval":
        parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval", "linear-probe"),
                            help="zeroshot: top-1/top-5 on labelled images; retrieval: recall@K on captioned images; "
                                 "linear-probe: logistic regression on frozen embeddings")
        parser.add_argument("--data", metavar="PATH",
                            help="zeroshot: ImageFolder directory or labelled webdataset (.tar shards with key.cls); "
                                 "retrieval: CSV/TSV/JSONL with image and caption columns, or .tar shards with key.txt")
        parser.add_argument("--classes", default=None, metavar="FILE|A,B,C",
                            help="class names in label order (default: the class folder names, '_' read as spaces); "
                                 "required for webdatasets")
        _templates(parser)
        parser.add_argument("--train", metavar="PATH", help="linear-probe training set (labelled, like --data)")
        parser.add_argument("--test", metavar="PATH", help="linear-probe test set (labelled, like --data)")
        parser.add_argument("--val-fraction", type=float, default=0.2,
                            help="linear probe: share of --train held out to choose the regularisation (default 0.2)")
        parser.add_argument("--max-iter", type=int, default=1000, help="linear probe: L-BFGS iterations (default 1000)")
        parser.add_argument("--seed", type=int, default=0, help="linear probe: validation split seed (default 0)")
        parser.add_argument("--ks", default="1,5,10", help="retrieval: comma-separated K values for recall@K (default 1,5,10)")
        parser.add_argument("--out", required=True, metavar="FILE.json", help="JSON report")
        parser.add_argument("--confusion", default=None, metavar="FILE.png",
                            help="zeroshot: write the confusion matrix as a PNG (default <out stem>.confusion.png)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing --out / --confusion (refused otherwise)")
    else:
        raise ValueError(f"clipforge.serve.cli has no sub-command {name!r}")


def _load_model(args):
    from ..model.weights import load

    if not os.path.exists(args.model):  # a file, or a directory: a training checkpoint or a run's output
        raise FileNotFoundError(f"checkpoint not found: {args.model}")
    return load(args.model, model_name=args.model_name)


def _refuse_existing(args, *paths: str | None) -> None:
    """Outputs are never replaced silently: an existing one needs --overwrite (checked before any work)."""
    taken = [p for p in paths if p and os.path.exists(p)]
    if taken and not args.overwrite:
        raise FileExistsError(f"{taken[0]} exists; pass --overwrite to replace it, or choose another --out")


def _common_kwargs(args) -> dict:
    return dict(device=args.device, amp=not args.no_amp, progress=args.progress)


def _read_texts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    with open(path, encoding="utf-8") as f:
        texts = [line.rstrip("\n").strip() for line in f]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path} holds no text (one text per line expected)")
    return texts


def run_embed(args) -> int:
    from .embed_file import write_embeddings
    from .datasets import list_images

    model = _load_model(args)
    if args.images:
        items = list_images(args.images)
        labels = [os.path.relpath(p, args.images) for p in items]
        kind = "image"
    else:
        items = labels = _read_texts(args.texts)
        kind = "text"
    res = write_embeddings(model, kind, items, args.out, labels=labels, batch_size=args.batch_size, index=args.index,
                           overwrite=args.overwrite, on_error=args.on_error,
                           stop_after_batches=args.stop_after_batches, **_common_kwargs(args))
    for _, source, reason in res["skipped"]:
        print(f"skipped: {source}: {reason}", file=sys.stderr)
    if res["complete"]:
        print(f"wrote {res['rows']} x {model.config.embed_dim} embeddings to {res['out']} and the index to "
              f"{res['index']} ({len(res['skipped'])} skipped)")
    else:
        print(f"stopped after {res['items_done']} of {res['count']} {kind}s ({res['rows']} rows in {res['out']}); "
              "rerun the same command to continue")
    return 0


def run_zeroshot(args) -> int:
    from .datasets import list_images
    from .prompts import get_templates, read_classnames

    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    _refuse_existing(args, args.out)
    classes = read_classnames(args.classes)
    templates = get_templates(args.templates)
    paths = list_images(args.images)
    model = _load_model(args)
    kw = _common_kwargs(args)
    clf = model.zero_shot_classifier(classes, templates, **kw)
    probs, skipped = model.classify(paths, clf, args.batch_size, on_error="skip", return_skipped=True, **kw)
    bad = {i for i, _ in skipped}
    kept = [p for i, p in enumerate(paths) if i not in bad]
    k = min(args.topk, len(classes))
    order = (-probs).argsort(1, kind="stable")[:, :k]
    tmp = f"{args.out}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prediction", "probability"] + [f"top{j + 1}_class" for j in range(k)]
                   + [f"top{j + 1}_prob" for j in range(k)])
        for p, row, pr in zip(kept, order, probs):
            w.writerow([os.path.relpath(p, args.images), classes[row[0]], f"{pr[row[0]]:.6f}"]
                       + [classes[c] for c in row] + [f"{pr[c]:.6f}" for c in row])
    os.replace(tmp, args.out)
    for i, reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"wrote {len(kept)} predictions over {len(classes)} classes to {args.out} ({len(skipped)} skipped)")
    return 0


def run_eval(args) -> int:
    from .evaluate import EvalConfig, evaluate

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    confusion = args.confusion
    if args.task == "zeroshot" and confusion is None:
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        confusion = f"{stem}.confusion.png"
    _refuse_existing(args, args.out, confusion if args.task == "zeroshot" else None)
    cfg = EvalConfig(task=args.task, data=args.data, classes=args.classes, templates=args.templates, train=args.train,
                     test=args.test, val_fraction=args.val_fraction, seed=args.seed, max_iter=args.max_iter, ks=ks,
                     batch_size=args.batch_size, device=args.device, amp=not args.no_amp, progress=args.progress,
                     confusion_png=confusion)
    model = _load_model(args)
    report = evaluate(model, cfg)
    report["model"] = args.model
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    headline = {k: v for k, v in report.items() if isinstance(v, float)}
    print(f"{args.task}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()) + f" -> {args.out}")
    return 0


_RUNNERS = {"embed": run_embed, "zeroshot": run_zeroshot, "eval": run_eval}


def run(args) -> int:
    from ..data.images import ImageReadError
    from ..model.weights import CheckpointError

    try:
        return _RUNNERS[args.command](args)
    except (CheckpointError, ImageReadError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"clipforge {args.command}: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    """`clipforge embed|zeroshot|eval ...` callable from tests: main(["embed", "--model", ...])."""
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation (`clipforge.serve.evaluate`): zero-shot classification, image-text retrieval, linear probe.

    report = zeroshot_eval(model, "val/", templates="imagenet")              # top1, top5, per class, confusion
    report = retrieval_eval(model, "captions.csv")                            # image->text, text->image R@1/5/10
    report = linear_probe(model, "train/", "test/")                          # L-BFGS logistic regression
    report = evaluate(model, EvalConfig(task="zeroshot", data="val/"))       # what `clipforge eval` runs

Datasets
--------
- Labelled images: an ImageFolder-style directory (one sub-folder per class, images anywhere below it;
  class names default to the folder names with "_" read as spaces), or a labelled webdataset (a
  folder of .tar shards, a glob, or "dir/{00000..00009}.tar"; each sample `key.<jpg|png|...>` +
  `key.cls` holding the integer label; class names then come from `classes`).
- Captioned images (retrieval): a CSV / TSV / JSON-lines table with an image-path column (image,
  filepath, path, file) and a caption column (caption, text, title), paths relative to the table's
  folder; several rows with the same image give that image several captions. Or webdataset shards
  whose `key.txt` holds one caption per line.
Unreadable images are skipped and reported (`skipped` in each report), never silently dropped.

Retrieval uses `clipforge.serve.retrieval.recall_at_k` (chunked top-k, never the images x captions matrix).
The linear probe follows the CLIP paper (appendix A.3): scikit-learn's L-BFGS logistic regression on
frozen, normalised image embeddings, with the inverse regularisation strength C chosen on a
validation split held out of the training set (a coarse log-grid over [1e-6, 1e6] refined around the
best value), then refitted on train + validation with that C and scored once on the test set.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .datasets import EvalDataError, _classnames_for, captioned_images, embed_labelled


TASKS = ("zeroshot", "retrieval", "linear-probe")


@dataclass
class EvalConfig:
    """One evaluation run (what `clipforge eval` builds from its options)."""

    task: str = "zeroshot"  # zeroshot | retrieval | linear-probe
    data: str | None = None  # zeroshot / retrieval dataset
    classes: str | list[str] | None = None  # class names: file, comma list, or list (default: folder names)
    templates: str | list[str] = "imagenet"  # template set name, JSON file or list
    train: str | None = None  # linear probe
    test: str | None = None  # linear probe
    val_fraction: float = 0.2
    seed: int = 0
    max_iter: int = 1000
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 64
    device: str | None = None
    amp: bool = True  # autocast (bf16 / fp16) on CUDA
    progress: bool | None = None
    confusion_png: str | None = None


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------

def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64: rows true class, columns predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def zeroshot_eval(model, data: str, classes=None, templates="imagenet", *, batch_size: int = 64, device=None,
                  amp: bool = True, progress=None, confusion_png: str | None = None) -> dict:
    """Zero-shot top-1 / top-5 accuracy on a labelled dataset (see the module doc); optional confusion PNG."""
    from .prompts import get_templates

    templates = get_templates(templates)
    emb, labels, folders, _, skipped = embed_labelled(model, data, batch_size=batch_size, device=device,
                                                      amp=amp, progress=progress)
    return zeroshot_report(model, data, emb, labels, folders, skipped, classes, templates, device=device, amp=amp,
                           progress=progress, confusion_png=confusion_png)


def zeroshot_report(model, data: str, emb: np.ndarray, labels: np.ndarray, folders, skipped, classes, templates, *,
                    classifier: np.ndarray | None = None, scale: float | None = None, device=None, amp: bool = True,
                    progress=None, confusion_png: str | None = None) -> dict:
    """`zeroshot_eval`'s report from the dataset's image embeddings (`embed_labelled`'s result): the
    classifier from the class names x templates (or `classifier`, made so by the caller: the trainer's
    ranks build it under ZeRO 3, where the model's weights are partitioned), then the scores and metrics."""
    from .embed import logit_scale, probabilities

    n_labels = int(labels.max()) + 1 if len(labels) else None
    names = _classnames_for(folders, classes, n_labels, data)
    if len(names) < 2:
        raise EvalDataError(f"{data} has {len(names)} class; zero-shot classification needs at least two classes")
    if len(labels) == 0:
        raise EvalDataError(f"{data}: no readable labelled image ({len(skipped)} skipped, first: {skipped[:1]})")
    clf = classifier if classifier is not None else model.zero_shot_classifier(names, templates, device=device,
                                                                               amp=amp, progress=progress)
    probs = probabilities(emb, clf, logit_scale(model) if scale is None else scale)
    preds = probs.argmax(1)
    c = len(names)
    cm = confusion_matrix(labels, preds, c)
    support = cm.sum(1)
    per_class = {names[i]: (float(cm[i, i] / support[i]) if support[i] else None) for i in range(c)}
    recalls = [v for v in per_class.values() if v is not None]
    report = {
        "task": "zeroshot", "data": data, "images": int(len(labels)), "classes": c, "templates": len(templates),
        "top1": topk_accuracy(probs, labels, 1), "top5": topk_accuracy(probs, labels, 5),
        "mean_per_class_recall": float(np.mean(recalls)), "per_class_accuracy": per_class,
        "skipped": skipped,
    }
    if c <= 100:  # a 1000-class matrix is 1M numbers: the PNG carries it
        report["confusion_matrix"] = cm.tolist()
    if confusion_png:
        save_confusion_png(cm, names, confusion_png, title=f"zero-shot top-1 {report['top1']:.1%} on {len(labels)} images")
        report["confusion_png"] = confusion_png
    return report


def save_confusion_png(cm: np.ndarray, names: Sequence[str], path: str, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    c = len(names)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    side = min(4 + 0.35 * c, 30)
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), labels=names, rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=names, fontsize=8)
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "zero-shot confusion matrix")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def retrieval_eval(model, data: str, *, ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, device=None,
                   amp: bool = True, progress=None, chunk_size: int | None = None) -> dict:
    """Image->text and text->image recall@K on a captioned dataset (chunked top-k; see the module doc)."""
    from .retrieval import recall_at_k

    images, sources, captions, owner = captioned_images(data)
    img_emb, bad = model.embed_images(images, batch_size, device=device, amp=amp, progress=progress, on_error="skip",
                                      return_skipped=True)
    bad_idx = {i for i, _ in bad}
    new_index = np.full(len(images), -1, dtype=np.int64)
    keep = [i for i in range(len(images)) if i not in bad_idx]
    new_index[keep] = np.arange(len(keep))
    owner = new_index[np.asarray(owner)]
    caption_keep = owner >= 0
    captions = [c for c, k in zip(captions, caption_keep) if k]
    if not keep:
        raise EvalDataError(f"{data}: none of its {len(images)} images could be read (first: {bad[0][1]})")
    txt_emb = model.embed_texts(captions, device=device, amp=amp, progress=progress)
    recalls = recall_at_k(torch.from_numpy(img_emb), torch.from_numpy(txt_emb), torch.from_numpy(owner[caption_keep]),
                          ks=ks, chunk_size=chunk_size)
    return {"task": "retrieval", "data": data, "images": len(keep), "captions": len(captions), **recalls,
            "skipped": [[sources[i], r] for i, r in bad]}


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------

def _fit(x, y, c: float, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)  # lbfgs, multinomial
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def search_regularisation(x_tr, y_tr, x_val, y_val, *, max_iter: int = 1000, seed: int = 0,
                          grid: Sequence[float] | None = None) -> tuple[float, dict[str, float]]:
    """The C (inverse L2 strength) with the best validation accuracy: a log-grid over [1e-6, 1e6] in steps
    of 100x, then the neighbours of the best at 10x and sqrt(10)x. Returns (best C, {C: accuracy})."""
    scores: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in scores:
            clf, _ = _fit(x_tr, y_tr, c, max_iter, seed)
            scores[c] = float((clf.predict(x_val) == y_val).mean())
        return scores[c]

    for c in grid if grid is not None else [10.0**e for e in range(-6, 7, 2)]:
        score(c)
    if grid is None:
        best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
        for f in (10.0, 10**0.5):
            for c in (best / f, best * f):
                if 1e-6 <= c <= 1e6:
                    score(c)
    best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))  # ties: the milder regularisation change
    return best, {f"{c:.3g}": a for c, a in sorted(scores.items())}


def linear_probe(model, train: str, test: str, *, classes=None, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, batch_size: int = 64, device=None, amp: bool = True, progress=None,
                 grid: Sequence[float] | None = None) -> dict:
    """Logistic-regression probe on frozen image embeddings: C chosen on a validation split of `train`,
    refit on all of `train`, top-1 / top-5 on `test`. `train` and `test` are labelled datasets (module doc)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x_tr, y_tr, f_tr, _, skip_tr = embed_labelled(model, train, batch_size=batch_size, device=device, amp=amp, progress=progress)
    x_te, y_te, f_te, _, skip_te = embed_labelled(model, test, batch_size=batch_size, device=device, amp=amp, progress=progress)
    if f_tr is not None and f_te is not None and f_tr != f_te:
        unknown = sorted(set(f_te) - set(f_tr))
        if unknown:
            raise EvalDataError(f"{test} has classes not in {train}: {', '.join(unknown[:5])}")
        remap = np.array([f_tr.index(f) for f in f_te])
        y_te = remap[y_te]
    classes_seen = np.unique(y_tr)
    if len(classes_seen) < 2:
        raise EvalDataError(f"{train} needs at least two classes with readable images for a linear probe")
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y_tr)
    stratify = y_tr if counts[counts > 0].min() >= 2 and int(val_fraction * len(y_tr)) >= len(classes_seen) else None
    idx_fit, idx_val = train_test_split(np.arange(len(y_tr)), test_size=val_fraction, random_state=seed,
                                        stratify=stratify)
    best_c, val_scores = search_regularisation(x_tr[idx_fit], y_tr[idx_fit], x_tr[idx_val], y_tr[idx_val],
                                               max_iter=max_iter, seed=seed, grid=grid)
    clf, converged = _fit(x_tr, y_tr, best_c, max_iter, seed)
    scores = clf.predict_proba(x_te)  # columns follow clf.classes_
    cols = {c: j for j, c in enumerate(clf.classes_)}
    full = np.full((len(y_te), int(max(y_tr.max(), y_te.max())) + 1), -np.inf)
    for c, j in cols.items():
        full[:, c] = scores[:, j]
    names = None
    if classes is not None or f_tr is not None:
        names = _classnames_for(f_tr, classes, int(max(y_tr.max(), y_te.max())) + 1, train)
    return {
        "task": "linear-probe", "train": train, "test": test, "train_images": int(len(y_tr)),
        "test_images": int(len(y_te)), "classes": int(full.shape[1]), "class_names": names,
        "top1": topk_accuracy(full, y_te, 1), "top5": topk_accuracy(full, y_te, 5),
        "C": best_c, "validation_accuracy": val_scores, "converged": converged,
        "skipped": skip_tr + skip_te,
    }


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def evaluate(model, cfg: EvalConfig) -> dict:
    """Run the evaluation `cfg.task` describes and return its JSON-ready report."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown evaluation task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    common = dict(batch_size=cfg.batch_size, device=cfg.device, amp=cfg.amp, progress=cfg.progress)
    if cfg.task == "linear-probe":
        if not cfg.train or not cfg.test:
            raise ValueError("the linear probe needs a training set and a test set (train=..., test=...)")
        return linear_probe(model, cfg.train, cfg.test, classes=cfg.classes, val_fraction=cfg.val_fraction,
                            seed=cfg.seed, max_iter=cfg.max_iter, **common)
    if not cfg.data:
        raise ValueError(f"the {cfg.task} evaluation needs a dataset (data=...)")
    if cfg.task == "zeroshot":
        return zeroshot_eval(model, cfg.data, cfg.classes, cfg.templates, confusion_png=cfg.confusion_png, **common)
    return retrieval_eval(model, cfg.data, ks=cfg.ks, **common)

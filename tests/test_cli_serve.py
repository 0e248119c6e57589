"""`clipforge embed | zeroshot | eval`: agreement with the API and encode_*, resume, reports, user errors."""
import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge import cli
from clipforge.data.images import preprocess
from clipforge.serve.embed_file import progress_path
from conftest import DIGIT_NAMES as NAMES, digit_pixels


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    clipforge.save(model, path)
    return model, str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Nested folder of odd-sized images, one corrupt file, one non-image file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    (root / "sub").mkdir()
    for i in range(9):
        where = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 41 - i, 3), dtype=np.uint8)).save(where / f"im{i}.png")
    (root / "im5_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_images_cli_agrees_with_api_and_encode_image(tiny_ckpt, image_dir, tmp_path, capsys):
    model, ckpt = tiny_ckpt
    out = tmp_path / "emb.npy"
    assert cli.main(["embed", "--model", ckpt, "--images", str(image_dir), "--out", str(out), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "im5_broken.jpg" in err  # skipped and reported
    emb = np.load(out)
    with open(tmp_path / "emb.index.csv") as f:
        index = list(csv.DictReader(f))
    assert [int(r["row"]) for r in index] == list(range(9)) and emb.shape == (9, model.config.embed_dim)
    paths = [str(image_dir / r["source"]) for r in index]
    assert sorted(os.path.basename(p) for p in paths) == [f"im{i}.png" for i in range(9)]
    np.testing.assert_allclose(emb, model.embed_images(paths), atol=2e-6, rtol=0)
    ref = model.encode_image(preprocess(paths, model.image_size), normalize=True).detach().numpy()
    np.testing.assert_allclose(emb, ref, atol=2e-6, rtol=0)
    # a complete output is not silently replaced
    assert cli.main(["embed", "--model", ckpt, "--images", str(image_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["embed", "--model", ckpt, "--images", str(image_dir), "--out", str(out), "--overwrite",
                     "--on-error", "raise"]) == 2
    assert "im5_broken.jpg" in capsys.readouterr().err


def test_embed_and_zeroshot_skip_pipes_devices_and_links_out(tiny_ckpt, tmp_path, capsys):
    """A named pipe hung `embed`; a link to /dev/zero made `zeroshot` read until the kernel killed it
    (19 GB). Both are now skipped without a read, reported, and the run goes on."""
    model, ckpt = tiny_ckpt
    root, outside = tmp_path / "imgs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 24), (40 * i, 90, 200)).save(root / f"ok{i}.png")
    Image.new("RGB", (20, 24), (1, 2, 3)).save(outside / "secret.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink(outside / "secret.png", root / "away.png")
    out = tmp_path / "emb.npy"
    assert cli.main(["embed", "--model", ckpt, "--images", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "pipe.jpg" in err and "not a regular file (a pipe)" in err
    assert "zero.jpg" in err and "away.png" in err and "outside the source folder" in err
    assert np.load(out).shape[0] == 3
    preds = tmp_path / "preds.csv"
    assert cli.main(["zeroshot", "--model", ckpt, "--images", str(root), "--classes", "red,blue",
                     "--out", str(preds)]) == 0
    printed = capsys.readouterr()
    assert "(3 skipped)" in printed.out and "a pipe" in printed.err
    with open(preds) as f:
        assert len(list(csv.DictReader(f))) == 3


def test_a_nan_model_is_never_served(image_dir, tmp_path, capsys):
    """A model.safetensors full of NaN (a diverged run) gave NaN embeddings and probabilities with exit
    0; `load` now refuses it, so embed / zeroshot / eval stop with one sentence and write nothing."""
    model = clipforge.create_model("tiny-vit")
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    clipforge.save(model, tmp_path / "nan.safetensors")
    ckpt = str(tmp_path / "nan.safetensors")
    for argv, out in [(["embed", "--images", str(image_dir)], tmp_path / "e.npy"),
                      (["zeroshot", "--images", str(image_dir), "--classes", "a,b"], tmp_path / "z.csv")]:
        assert cli.main([argv[0], "--model", ckpt, *argv[1:], "--out", str(out)]) == 2
        assert "non-finite weights" in capsys.readouterr().err and not out.exists()


def test_embed_texts_cli_agrees_with_api_and_encode_text(tiny_ckpt, tmp_path):
    model, ckpt = tiny_ckpt
    texts = ["a photo of a cat", "a diagram, with commas", "Ünïcödé", "long " * 100]
    (tmp_path / "t.txt").write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    out, index = tmp_path / "t.npy", tmp_path / "rows.csv"
    assert cli.main(["embed", "--model", ckpt, "--texts", str(tmp_path / "t.txt"), "--out", str(out),
                     "--index", str(index), "--batch-size", "3"]) == 0
    emb = np.load(out)
    with open(index) as f:
        assert [r["source"] for r in csv.DictReader(f)] == [t.strip() for t in texts]
    np.testing.assert_allclose(emb, model.embed_texts([t.strip() for t in texts]), atol=2e-6, rtol=0)
    ref = model.encode_text(clipforge.tokenize([t.strip() for t in texts]), normalize=True).detach().numpy()
    np.testing.assert_allclose(emb, ref, atol=2e-6, rtol=0)


def test_embed_cli_resumes_to_the_same_file(tiny_ckpt, image_dir, tmp_path, capsys):
    _, ckpt = tiny_ckpt
    base = ["embed", "--model", ckpt, "--images", str(image_dir), "--batch-size", "3"]
    assert cli.main(base + ["--out", str(tmp_path / "full.npy")]) == 0
    part = str(tmp_path / "part.npy")
    for done in (3, 6):  # two interrupted runs, then the rest
        assert cli.main(base + ["--out", part, "--stop-after-batches", "1"]) == 0
        assert "rerun the same command" in capsys.readouterr().out
        assert json.load(open(progress_path(part)))["items_done"] == done
    assert cli.main(base + ["--out", part]) == 0
    assert not os.path.exists(progress_path(part))
    np.testing.assert_array_equal(np.load(part), np.load(tmp_path / "full.npy"))
    assert open(tmp_path / "part.index.csv").read() == open(tmp_path / "full.index.csv").read()
    # resuming with another batch size would misalign the batches: refused
    assert cli.main(base[:-1] + ["5", "--out", str(tmp_path / "full.npy")]) == 2


def test_zeroshot_cli_predictions(digits_clip, tmp_path):
    model, images, labels, test_idx = digits_clip
    ckpt = tmp_path / "digits.safetensors"
    clipforge.save(model, ckpt)
    pixels = digit_pixels(images[test_idx[:80]])
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(pixels):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i:03d}_{int(labels[test_idx[i]])}.png")
    out = tmp_path / "pred.csv"
    assert cli.main(["zeroshot", "--model", str(ckpt), "--images", str(tmp_path / "imgs"), "--classes", ",".join(NAMES),
                     "--templates", "a handwritten {}", "--out", str(out), "--topk", "3"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 80 and set(rows[0]) >= {"path", "prediction", "probability", "top3_class", "top3_prob"}
    assert all(r["prediction"] == r["top1_class"] and float(r["top1_prob"]) >= float(r["top2_prob"]) for r in rows)
    acc = np.mean([r["prediction"] == NAMES[int(r["path"].split("_")[1][0])] for r in rows])
    assert acc > 0.5, f"zero-shot accuracy {acc:.1%} through the CLI (chance 10%)"
    probs = model.classify([str(tmp_path / "imgs" / r["path"]) for r in rows],
                           model.zero_shot_classifier(NAMES, ["a handwritten {}"]))
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(1), atol=2e-6)


def test_eval_cli_reports(digits_clip, tmp_path):
    model, images, labels, test_idx = digits_clip
    ckpt = tmp_path / "digits.safetensors"
    clipforge.save(model, ckpt)
    pixels = digit_pixels(images[test_idx[:150]])
    rows = []
    for i, a in enumerate(pixels):
        name = NAMES[int(labels[test_idx[i]])]
        split = "train" if i < 100 else "test"
        (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / split / name / f"{i}.png")
        rows.append(f"{split}/{name}/{i}.png,a handwritten {name}")
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    base = ["eval", "--model", str(ckpt)]
    rep = tmp_path / "zs.json"
    assert cli.main(base + ["--task", "zeroshot", "--data", str(tmp_path / "train"), "--templates", "digits",
                            "--out", str(rep)]) == 0
    r = json.load(open(rep))
    assert r["task"] == "zeroshot" and r["images"] == 100 and 0 <= r["top1"] <= r["top5"] <= 1
    assert os.path.getsize(tmp_path / "zs.confusion.png") > 1000 and r["confusion_png"].endswith("zs.confusion.png")
    assert cli.main(base + ["--task", "retrieval", "--data", str(tmp_path / "captions.csv"), "--ks", "1,5",
                            "--out", str(tmp_path / "ret.json")]) == 0
    r = json.load(open(tmp_path / "ret.json"))
    assert r["images"] == 150 and set(r) >= {"image_to_text_R@1", "text_to_image_R@5"}
    assert cli.main(base + ["--task", "linear-probe", "--train", str(tmp_path / "train"), "--test",
                            str(tmp_path / "test"), "--out", str(tmp_path / "lp.json")]) == 0
    r = json.load(open(tmp_path / "lp.json"))
    assert r["task"] == "linear-probe" and r["train_images"] == 100 and r["test_images"] == 50 and r["top1"] > 0.5
    # an existing report (or its confusion PNG) is never replaced silently, and the refusal comes before any work
    before = {p: p.read_bytes() for p in (rep, tmp_path / "zs.confusion.png")}
    for argv in (base + ["--task", "zeroshot", "--data", str(tmp_path / "train"), "--out", str(rep)],
                 base + ["--task", "zeroshot", "--data", str(tmp_path / "test"), "--out", str(tmp_path / "new.json"),
                         "--confusion", str(tmp_path / "zs.confusion.png")],
                 ["zeroshot", "--model", str(tmp_path / "no-such.pt"), "--images", str(tmp_path / "test"),
                  "--classes", ",".join(NAMES), "--out", str(rep)]):
        assert cli.main(argv) == 2, argv
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "new.json").exists()
    assert cli.main(base + ["--task", "zeroshot", "--data", str(tmp_path / "test"), "--templates", "digits",
                            "--out", str(rep), "--overwrite"]) == 0
    assert json.load(open(rep))["images"] == 50


def test_user_errors_are_one_line(tiny_ckpt, image_dir, tmp_path, capsys):
    _, ckpt = tiny_ckpt
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (["embed", "--model", str(tmp_path / "missing.pt"), "--texts", str(tmp_path / "notes.txt"), "--out",
          str(tmp_path / "a.npy")], "checkpoint not found"),
        (["embed", "--model", str(tmp_path / "notes.txt"), "--texts", str(tmp_path / "notes.txt"), "--out",
          str(tmp_path / "a.npy")], "could not be read as a CLIP checkpoint"),
        (["embed", "--model", str(tmp_path / "other.pt"), "--texts", str(tmp_path / "notes.txt"), "--out",
          str(tmp_path / "a.npy")], "cannot infer the CLIP architecture"),
        (["embed", "--model", ckpt, "--texts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "a.npy")],
         "holds no text"),
        (["zeroshot", "--model", ckpt, "--images", str(image_dir), "--classes", "cat,dog,cat", "--out",
          str(tmp_path / "p.csv")], "duplicate class name 'cat'"),
        (["eval", "--model", ckpt, "--task", "zeroshot", "--data", str(image_dir), "--out", str(tmp_path / "r.json")],
         "needs at least two classes"),
        (["eval", "--model", ckpt, "--task", "linear-probe", "--train", str(image_dir), "--out",
          str(tmp_path / "r.json")], "needs a training set and a test set"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", ["embed", "zeroshot", "eval"])
def test_help_explains_every_option(name, capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--out" in out

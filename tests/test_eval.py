"""clipforge.eval: zero-shot on ImageFolder / labelled webdataset, retrieval recall, linear probe, bad datasets."""
import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.serve import evaluate as cfeval
from clipforge.serve import datasets
from clipforge.reference import retrieval_recall
from clipforge.serve.retrieval import recall_at_k
from conftest import DIGIT_NAMES as NAMES, digit_pixels

TEMPLATES = ["a handwritten {}", "a scan of the number {}"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_folder(root, pixels, labels):
    for i, (a, y) in enumerate(zip(pixels, labels)):
        d = root / NAMES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(_png(a))


@pytest.fixture(scope="module")
def digit_sets(digits_clip, tmp_path_factory):
    """Held-out digits as an ImageFolder (with one corrupt file), and train/test folders for the probe."""
    model, images, labels, test_idx = digits_clip
    root = tmp_path_factory.mktemp("digits")
    test_pix, test_lab = digit_pixels(images[test_idx]), labels[test_idx].numpy()
    _write_folder(root / "val", test_pix, test_lab)
    (root / "val" / "seven" / "zz_corrupt.png").write_bytes(b"\x89PNG but not really")
    # probe: 400 training-split images to train on, the held-out ones to test on
    train_idx = torch.tensor([i for i in range(len(labels)) if i not in set(test_idx.tolist())])[:400]
    _write_folder(root / "probe_train", digit_pixels(images[train_idx]), labels[train_idx].numpy())
    return model, root, test_pix, test_lab


def test_zeroshot_on_image_folder(digit_sets, tmp_path):
    model, root, pixels, labels = digit_sets
    png = tmp_path / "cm.png"
    rep = cfeval.zeroshot_eval(model, str(root / "val"), templates=TEMPLATES, confusion_png=str(png), batch_size=50)
    assert rep["images"] == len(labels) and rep["classes"] == 10
    assert len(rep["skipped"]) == 1 and rep["skipped"][0][0].endswith("zz_corrupt.png")
    assert rep["top1"] > 0.5, f"zero-shot top-1 {rep['top1']:.1%} on real digits (chance 10%)"
    assert rep["top5"] >= rep["top1"]
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == len(labels) and np.trace(cm) / cm.sum() == pytest.approx(rep["top1"])
    # the same numbers straight from the API, on the same pixels in the same (folder) order
    order = np.argsort([f"{NAMES[y]}/{i:04d}" for i, y in enumerate(labels)], kind="stable")
    probs = model.classify(list(pixels[order]), model.zero_shot_classifier(NAMES, TEMPLATES))
    assert rep["top1"] == pytest.approx(float((probs.argmax(1) == labels[order]).mean()))
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.format == "PNG"


def test_zeroshot_on_labelled_webdataset(digit_sets, tmp_path):
    model, _, pixels, labels = digit_sets
    n = 120
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(n):
            add(f"{i:06d}.png", _png(pixels[i]))
            add(f"{i:06d}.cls", str(int(labels[i])).encode())
        add("nolabel.png", _png(pixels[0]))
        add("broken.png", b"junk")
        add("broken.cls", b"3")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    rep = cfeval.zeroshot_eval(model, str(tmp_path), classes=str(classes), templates=TEMPLATES)
    assert rep["images"] == n
    assert sorted(k.split(":")[1] for k, _ in rep["skipped"]) == ["broken", "nolabel"]
    probs = model.classify(list(pixels[:n]), model.zero_shot_classifier(NAMES, TEMPLATES))
    assert rep["top1"] == pytest.approx(float((probs.argmax(1) == labels[:n]).mean()))
    with pytest.raises(datasets.EvalDataError, match="give the class names"):
        cfeval.zeroshot_eval(model, str(tmp_path / "00000.tar"), templates=TEMPLATES)
    with pytest.raises(datasets.EvalDataError, match="label 9 but only 3 class names"):
        cfeval.zeroshot_eval(model, str(tmp_path / "00000.tar"), classes="a,b,c", templates=TEMPLATES)


def test_retrieval_matches_full_matrix_reference(digit_sets, tmp_path):
    model, _, pixels, labels = digit_sets
    rng = np.random.default_rng(0)
    rows, n = [], 60
    for i in range(n):
        Image.fromarray(pixels[i]).save(tmp_path / f"{i}.png")
        for _ in range(1 + i % 3):  # one to three captions per image
            rows.append({"image": f"{i}.png", "caption": rng.choice(TEMPLATES).format(NAMES[labels[i]])})
    rows.append({"image": "missing.png", "caption": "a handwritten one"})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    rep = cfeval.retrieval_eval(model, str(tmp_path / "captions.csv"), chunk_size=7)
    assert rep["images"] == n and rep["captions"] == len(rows) - 1
    assert rep["skipped"] == [["missing.png", rep["skipped"][0][1]]] and "missing.png" in rep["skipped"][0][1]
    img = torch.from_numpy(model.embed_images([str(tmp_path / f"{i}.png") for i in range(n)]))
    txt = torch.from_numpy(model.embed_texts([r["caption"] for r in rows[:-1]]))
    owner = torch.tensor([int(r["image"].split(".")[0]) for r in rows[:-1]])
    # the same embeddings and caption->image map through the chunked recall (identical captions tie, so
    # the full-matrix reference may break ties differently: test_retrieval compares the two on tie-free data)
    want = recall_at_k(img, txt, owner, chunk_size=7)
    assert {k: rep[k] for k in want} == want
    ref = retrieval_recall(img, txt, owner)
    assert all(abs(rep[k] - float(v)) <= 0.1 for k, v in ref.items()), (rep, ref)
    assert rep["image_to_text_R@10"] > 0.3  # a trained model: far above the 10/len(captions) of chance
    # the same set as JSON lines, captions as a list per image
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"filepath": f"{i}.png", "captions": [r["caption"] for r in rows if r["image"] == f"{i}.png"]}) + "\n")
    rep2 = cfeval.retrieval_eval(model, str(tmp_path / "captions.jsonl"), chunk_size=7)
    assert {k: rep2[k] for k in want} == {k: rep[k] for k in want}


def test_linear_probe(digit_sets):
    model, root, _, _ = digit_sets
    rep = cfeval.linear_probe(model, str(root / "probe_train"), str(root / "val"), seed=0)
    assert rep["train_images"] == 400 and rep["classes"] == 10 and len(rep["skipped"]) == 1
    assert rep["top1"] > 0.7, rep
    assert 1e-6 <= rep["C"] <= 1e6 and len(rep["validation_accuracy"]) >= 7
    assert max(rep["validation_accuracy"].values()) == rep["validation_accuracy"][f"{rep['C']:.3g}"]


def test_linear_probe_search_picks_the_best_validation_c():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    best, scores = cfeval.search_regularisation(x[:200], y[:200], x[200:], y[200:], grid=[1e-6, 1.0])
    assert best == 1.0 and scores["1e-06"] < scores["1"]  # heavy regularisation predicts one class


def test_bad_datasets(digit_sets, tmp_path):
    model, root, _, _ = digit_sets
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.EvalDataError, match="no class sub-folders"):
        cfeval.zeroshot_eval(model, str(tmp_path / "empty"))
    with pytest.raises(datasets.EvalDataError, match="10 class folders but 2 class names"):
        cfeval.zeroshot_eval(model, str(root / "val"), classes="a,b")
    with pytest.raises(ValueError, match="duplicate class name"):
        cfeval.zeroshot_eval(model, str(root / "val"), classes=",".join(NAMES[:9] + ["zero"]))
    (tmp_path / "bad.csv").write_text("file_name,label\nx.png,1\n")
    with pytest.raises(datasets.EvalDataError, match="no image-path column"):
        cfeval.retrieval_eval(model, str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="unknown evaluation task"):
        cfeval.evaluate(model, cfeval.EvalConfig(task="captioning", data="x"))


def test_a_plain_state_dict_loads_bit_exact_with_its_model_name(digit_sets, tmp_path):
    """`torch.save(model.state_dict())` of the trained digits model: `clipforge.load(p, model_name=...)` gives
    the same tensors bit for bit and the same zero-shot report; without a name it is refused (a plain state
    dict does not say its activation or heads)."""
    import clipforge
    from clipforge.model.weights import CheckpointError

    model, root, _, _ = digit_sets
    p = tmp_path / "digits.pt"
    torch.save(model.state_dict(), p)
    loaded = clipforge.load(str(p), model_name="tiny-vit")
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    reports = [cfeval.zeroshot_eval(m, str(root / "val"), templates=TEMPLATES, batch_size=50) for m in (model, loaded)]
    assert reports[0] == reports[1] and reports[0]["top1"] > 0.5
    with pytest.raises(CheckpointError, match="plain state dict.*model_name="):
        clipforge.load(str(p))
    # a one-element logit_scale (as DeepSpeed's module state holds it) fits the 0-dim parameter; two do not
    sd = dict(want, logit_scale=want["logit_scale"].reshape(1))
    assert torch.equal(clipforge.load(sd, model_name="tiny-vit").logit_scale, want["logit_scale"])
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: logit_scale \(checkpoint \(2,\), model \(\)\)"):
        clipforge.load(dict(want, logit_scale=torch.ones(2)), model_name="tiny-vit")

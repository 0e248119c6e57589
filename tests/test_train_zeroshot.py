"""Zero-shot evaluation during training (`evaluation.zeroshot`, engine/train/zeroshot.py).

The must-show: the top-1 / top-5 / per-class recall a run logs at a step equal what `clipforge eval
--task zeroshot` reports on that step's checkpoint (and at the end on the final model), on one process
and on 2 ranks under ZeRO 3, whose logged values equal the one-process run's. Also: the ranks' shares
of the images put back together are `embed_labelled`'s result exactly, TensorBoard gets the scalars,
summary.json the last result, and preflight / the config refuse a bad section in one sentence.
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from test_train import (_merge, one_rank, read_metrics, run_main, run_two_ranks,  # noqa: F401 (one_rank: a fixture)
                        write_config, write_digit_folder)

pytest.importorskip("deepspeed")

BATCH = 20  # 50 digits: batches of 20, 20, 10; on 2 ranks rank 0 has two, rank 1 one (and a stand-in)
LOGGED = {"zeroshot_top1": "top1", "zeroshot_top5": "top5", "zeroshot_mean_per_class_recall": "mean_per_class_recall",
          "zeroshot_per_class_recall": "per_class_accuracy", "zeroshot_images": "images"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from clipforge.model.config import get_preset

    return write_digit_folder(tmp_path_factory.mktemp("zs") / "digits", get_preset("tiny-vit").vision.image_size)


def _config(tmp_path, name, digits, **sections):
    zeroshot = {"path": digits, "templates": "digits", "every_steps": 2, "batch_size": BATCH}
    # seed 0 and a small rate: a model (nearly untrained) whose predictions spread over several classes, so
    # that the per-class recalls say which images went where (tiny-vit trained on the synthetic data at
    # BASE's rate puts every digit in one class)
    return write_config(tmp_path, name, **_merge({
        "seed": 0, "optimizer": {"lr": 1.0e-4}, "max_steps": 4,
        "checkpointing": {"every_steps": 2, "keep_last": 3, "save_final": True},
        "evaluation": {"zeroshot": zeroshot}}, sections))


def cli_report(model_path, data, out) -> dict:
    from clipforge import cli

    argv = ["eval", "--model", str(model_path), "--task", "zeroshot", "--data", data, "--templates", "digits",
            "--batch-size", str(BATCH), "--out", str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def check_against_cli(out_dir, data, tmp_path) -> dict:
    """The logged zero-shot values of steps 2 and 4 equal `clipforge eval` on checkpoint step_000002 and
    on the final model; steps 1 and 3 log none; summary.json holds the step-4 report. -> {step: logged}"""
    records = {r["step"]: r for r in read_metrics(out_dir)}
    assert sorted(records) == [1, 2, 3, 4]
    assert not any(k.startswith("zeroshot_") for s in (1, 3) for k in records[s])
    logged = {s: {k: records[s][k] for k in LOGGED} for s in (2, 4)}
    for step, model in ((2, out_dir / "checkpoints" / "step_000002"), (4, out_dir / "model.safetensors")):
        rep = cli_report(model, data, tmp_path / f"cli{step}.json")
        assert rep["images"] == 50 and rep["classes"] == 10
        assert logged[step] == {k: rep[name] for k, name in LOGGED.items()}, f"step {step}"
        assert records[step]["zeroshot_skipped"] == len(rep["skipped"]) == 0
        assert sum(1 for column in zip(*rep["confusion_matrix"]) if any(column)) >= 3  # several classes predicted
    assert logged[2] != logged[4]  # two models, told apart
    summary = json.loads((out_dir / "summary.json").read_text())["zeroshot"]
    assert summary["step"] == 4
    assert {k: summary[k] for k in ("top1", "top5", "per_class_accuracy", "confusion_matrix", "templates")} == \
        {k: rep[k] for k in ("top1", "top5", "per_class_accuracy", "confusion_matrix", "templates")}
    return logged


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_rank, digits):
    tmp = tmp_path_factory.mktemp("zs1")
    config = _config(tmp, "one", digits, logging={"tensorboard": True})
    assert run_main(config) == 0
    return tmp, tmp / "one"


def test_logged_zeroshot_equals_clipforge_eval_on_one_process(one_process, digits):
    tmp, out = one_process
    logged = check_against_cli(out, digits, tmp)
    # TensorBoard: top-1, top-5 and the mean per-class recall as scalars at the evaluated steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for key in ("top1", "top5", "mean_per_class_recall"):
        events = acc.Scalars(f"zeroshot/{key}")
        assert [e.step for e in events] == [2, 4]
        assert [e.value for e in events] == pytest.approx([logged[2][f"zeroshot_{key}"], logged[4][f"zeroshot_{key}"]])
    assert not [t for t in tags if "per_class_recall" in t and "mean" not in t]


@pytest.mark.parametrize("stage", [2, 3])
def test_logged_zeroshot_on_two_ranks_equals_one_process_and_clipforge_eval(one_process, digits, tmp_path, stage):
    """ZeRO 3: the weights partitioned, rank 1 with one batch fewer (a stand-in forward); ZeRO 2: only rank 0
    builds the classifier."""
    _, out1 = one_process
    config = _config(tmp_path, "two", digits, batch={"micro_size": 8}, deepspeed={"zero_stage": stage})
    run_two_ranks(config)
    logged = check_against_cli(tmp_path / "two", digits, tmp_path)
    records = {r["step"]: r for r in read_metrics(out1)}
    assert logged == {s: {k: records[s][k] for k in LOGGED} for s in (2, 4)}


def test_every_steps_0_evaluates_at_the_end_only_and_leaves_training_as_it_was(tmp_path, one_rank, digits):
    sections = dict(max_steps=3, checkpointing={"every_steps": 0, "save_final": False})
    config = _config(tmp_path, "end", digits, **sections, evaluation={"zeroshot": {"every_steps": 1}})
    assert run_main(config, "--set", "evaluation.zeroshot.every_steps=0") == 0
    records = read_metrics(tmp_path / "end")
    assert [r["step"] for r in records if "zeroshot_top1" in r] == [3]
    assert json.loads((tmp_path / "end" / "summary.json").read_text())["zeroshot"]["step"] == 3
    # evaluating after every step changes nothing of the training (train mode back, no RNG drawn)
    assert run_main(config, "--output-dir", str(tmp_path / "every")) == 0
    every = read_metrics(tmp_path / "every")
    assert all("zeroshot_top1" in r for r in every)
    assert run_main(config, "--output-dir", str(tmp_path / "off"), "--set", "evaluation.zeroshot.path=null",
                    "--set", "evaluation.zeroshot.every_steps=0") == 0
    off = read_metrics(tmp_path / "off")
    assert [r["loss"] for r in every] == [r["loss"] for r in off] == [r["loss"] for r in records]
    assert "zeroshot" not in json.loads((tmp_path / "off" / "summary.json").read_text())


# ------------------------------------------------------------------------ the ranks' shares
def _labelled_shards(folder, digits) -> str:
    """Two tars of the digit images with .cls labels, plus a sample without a label and an unreadable image."""
    from clipforge.serve.datasets import image_folder

    paths, labels, _ = image_folder(digits)
    os.makedirs(folder)
    for s, chunk in enumerate((range(0, 23), range(23, 50))):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for i in chunk:
                add(f"{i:04d}.png", open(paths[i], "rb").read())
                add(f"{i:04d}.cls", str(int(labels[i])).encode())
                if i == 5:
                    add("nolabel.png", open(paths[i], "rb").read())
                    add("broken.png", b"not an image")
                    add("broken.cls", b"3")
    return folder


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_shares_merged_are_embed_labelled_exactly(tmp_path, digits, kind):
    import shutil

    import clipforge
    from clipforge.serve.datasets import embed_labelled, embed_labelled_part, merge_labelled

    data = digits
    if kind == "folder":  # an unreadable image in one class folder
        data = str(tmp_path / "digits")
        shutil.copytree(digits, data)
        (tmp_path / "digits" / "three" / "zz_broken.png").write_bytes(b"not an image")
    else:
        data = _labelled_shards(str(tmp_path / "shards"), digits)
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    want = embed_labelled(model, data, batch_size=7)
    assert len(want[4]) == (1 if kind == "folder" else 2)  # the broken image (and the sample without a label)
    for world in (2, 3, 9):  # 9 ranks: more ranks than batches
        parts = [embed_labelled_part(model, data, rank=r, world=world, batch_size=7) for r in range(world)]
        got = merge_labelled(parts)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert got[2:] == want[2:]
        assert sum(p.forwards for p in parts) == -(-(len(want[1]) + 1) // 7)


def test_labelled_shards_with_class_names_log_what_clipforge_eval_reports(tmp_path, one_rank, digits):
    """Shards with .cls labels (one sample without a label, one unreadable image), class names given."""
    from clipforge import cli
    from clipforge.serve.datasets import image_folder

    shards = _labelled_shards(str(tmp_path / "shards"), digits)
    names = ",".join(image_folder(digits)[2])  # label i is the i-th folder
    config = _config(tmp_path, "wds", digits, max_steps=2, checkpointing={"every_steps": 0, "save_final": False},
                     evaluation={"zeroshot": {"path": shards, "classes": names, "every_steps": 0}})
    assert run_main(config) == 0
    record = read_metrics(tmp_path / "wds")[-1]
    out = tmp_path / "wds.json"
    assert cli.main(["eval", "--model", str(tmp_path / "wds" / "model.safetensors"), "--task", "zeroshot", "--data",
                     shards, "--classes", names, "--templates", "digits", "--batch-size", str(BATCH),
                     "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["images"] == 50 and len(rep["skipped"]) == 2 == record["zeroshot_skipped"]
    assert {k: record[k] for k in LOGGED} == {k: rep[name] for k, name in LOGGED.items()}


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("case, sets, words", [
    ("missing_path", ["evaluation.zeroshot.path={missing}"], ["'evaluation.zeroshot.path'", "does not exist"]),
    ("no_images", ["evaluation.zeroshot.path={empty}"], ["'evaluation.zeroshot.path'", "no class sub-folders"]),
    ("unknown_templates", ["evaluation.zeroshot.templates=nosuchset"], ["'evaluation.zeroshot.templates'",
                                                                       "nosuchset", "digits"]),
    ("classes_mismatch", ["evaluation.zeroshot.classes=a,b,c"], ["'evaluation.zeroshot.classes'", "10 class folders",
                                                                 "3 class names"]),
    ("shards_without_labels", ["evaluation.zeroshot.path={unlabelled}", "evaluation.zeroshot.classes=a,b"],
     ["'evaluation.zeroshot.path'", "labelled sample"]),
    ("shards_without_classes", ["evaluation.zeroshot.path={labelled}"], ["'evaluation.zeroshot.classes'",
                                                                           "give the class names"]),
    ("unknown_key", ["evaluation.zeroshot.frequency=2"], ["unknown config key 'evaluation.zeroshot.frequency'",
                                                          "every_steps"]),
    ("batch_size_0", ["evaluation.zeroshot.batch_size=0"], ["'evaluation.zeroshot.batch_size'"]),
    ("every_negative", ["evaluation.zeroshot.every_steps=-1"], ["'evaluation.zeroshot.every_steps'"]),
])
def test_a_bad_zeroshot_section_stops_before_the_run_in_one_sentence(tmp_path, digits, capsys, case, sets, words):
    (tmp_path / "empty").mkdir()
    image = os.path.join(digits, "one", sorted(os.listdir(os.path.join(digits, "one")))[0])
    for tar_name, names in (("unlabelled", ("a.png", "a.txt")), ("labelled", ("a.png", "a.cls"))):
        with tarfile.open(tmp_path / f"{tar_name}.tar", "w") as tar:  # (the .txt / .cls: any bytes will do)
            for name in names:
                tar.add(image, arcname=name)
    config = _config(tmp_path, case, digits)
    fill = {"missing": str(tmp_path / "nope" / "val"), "empty": str(tmp_path / "empty"),
            "unlabelled": str(tmp_path / "unlabelled.tar"), "labelled": str(tmp_path / "labelled.tar")}
    argv = [a for s in sets for a in ("--set", s.format(**fill))]
    assert run_main(config, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipforge train: "), err
    for word in words:
        assert word in err, err
    assert not (tmp_path / case).exists()  # nothing written

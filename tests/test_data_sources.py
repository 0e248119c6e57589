"""Several data sources mixed per batch, and resampled shards (engine/data/sources.py): OpenCLIP's
`--train-data "a::b"`, `--train-data-upsampling-factors` and `--dataset-resampled`, as `data.sources`,
`data.path: "a::b"` + `data.upsampling_factors` and `data.resampled`, deterministic from the seed and
resumed exactly mid-epoch, on both loaders, one process or two ranks, refused by name when wrong."""
import io
import json
import math
import os
import tarfile
from collections import Counter

import pytest
import torch
import yaml
from PIL import Image

from clipforge.data import DataConfig, build_train_loader
from test_preflight import probe_inputs, run_probe, write_tar
from test_train import (_merge, _plant_corrupt, _write_shards, assert_losses_close, one_rank,  # noqa: F401
                        read_metrics, read_weights, run_main, run_two_ranks, write_config)


def id_tokenizer(texts):
    return torch.zeros(len(texts), 77, dtype=torch.long)


def write_source(folder, prefix: str, n_shards: int, per_shard: int, seed: int = 1) -> str:
    """Shards whose sample keys start with `prefix` (so a key tells its source), distinct colours."""
    os.makedirs(folder, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                color = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=rng))
                buf = io.BytesIO()
                Image.new("RGB", (32, 28), color).save(buf, format="JPEG")
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"{prefix} colour {color}".encode())):
                    info = tarfile.TarInfo(f"{prefix}{s:03d}{i:03d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Source a: 2 shards x 12 samples; source b: 4 shards x 6 (24 samples each); and a read cache."""
    root = tmp_path_factory.mktemp("sources")
    return {"a": write_source(root / "a", "a", 2, 12, seed=1), "b": write_source(root / "b", "b", 4, 6, seed=2),
            "cache": str(root / "cache")}


def cfg_of(two, backend="pytorch", **kw):
    base = dict(kind="webdataset", loader=backend, num_workers=0 if backend == "pytorch" else 1,
                cache_dir=two["cache"], batch_size=8, drop_last=True, device="cpu",
                sources=[{"path": two["a"], "weight": 3}, {"path": two["b"], "weight": 1}])
    base.update(kw)
    if "path" in kw:
        base.pop("sources")
    return DataConfig.from_dict(base)


def loader_of(cfg, rank=0, world_size=1):
    return build_train_loader(cfg, rank, world_size, image_size=32, tokenizer=id_tokenizer, with_keys=True)


def planned_keys(loader, n_samples: int) -> list[str]:
    """The keys the loader's passes deliver, from its plans (nothing decoded), epoch after epoch."""
    keys, epoch = [], loader.epoch
    while len(keys) < n_samples:
        loader.set_epoch(epoch)
        plan = loader._plan()
        keys += [plan.key(i) for b in range(plan.num_batches) for i in plan.batch_range(b)]
        epoch += 1
    return keys[:n_samples]


def delivered(loader, n_batches: int):
    out = []
    while len(out) < n_batches:
        for images, _, keys in loader:
            out.append((images, list(keys)))
            if len(out) == n_batches:
                break
    return out


def assert_share(keys, prefix: str, p: float):
    n, got = len(keys), sum(k.startswith(prefix) for k in keys)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(got - n * p) <= 3 * sd, f"{got} of {n} from source {prefix}, expected {n * p:.0f} +- {3 * sd:.0f}"


# ------------------------------------------------------------------------------------ (a) mixing
def test_two_sources_weighted_3_to_1_mix_each_batch(two):
    loader = loader_of(cfg_of(two))
    assert loader.mix.weights == [3.0, 1.0] and len(loader) == 48 // 8
    keys = planned_keys(loader, 2000)
    assert_share(keys, "a", 0.75)
    per_batch = Counter(sum(k.startswith("a") for k in keys[i:i + 8]) for i in range(0, 2000, 8))
    assert len(per_batch) > 2  # every slot is a draw: batches differ in their mix, not a fixed quota
    # source a holds 24 samples but gives 3/4 of 2,000: it cycles epoch after epoch of its own, each of
    # them every one of its samples once
    a_keys = [k for k in keys if k.startswith("a")]
    for e in range(len(a_keys) // 24):
        assert len(set(a_keys[24 * e: 24 * e + 24])) == 24


@pytest.mark.parametrize("factors, share_a", [([3, 1], 6 / 10), (None, 2 / 6)])
def test_openclip_path_form_and_upsampling_factors(tmp_path, factors, share_a):
    """data.path "a::b" with OpenCLIP's upsampling factors: a factor scales each shard's draw
    probability, so a source's share is factor x size (a: 2 x 12 samples, b: 4 x 12); no factors:
    in proportion to size."""
    a, b = write_source(tmp_path / "a", "a", 2, 12), write_source(tmp_path / "b", "b", 4, 12, seed=5)
    cfg = DataConfig.from_dict(dict(kind="webdataset", path=f"{a}::{b}", upsampling_factors=factors, loader="pytorch",
                                    num_workers=0, cache_dir=str(tmp_path / "cache"), batch_size=8, drop_last=True))
    loader = loader_of(cfg)
    assert loader.mix.weights == ([3.0 * 24, 1.0 * 48] if factors else [24.0, 48.0])
    assert_share(planned_keys(loader, 2000), "a", share_a)


def test_two_ranks_split_the_same_global_batches(two):
    """Rank r of W takes slots [r B, (r + 1) B) of each global batch: the global batches are those of one
    process, whatever W."""
    one = planned_keys(loader_of(cfg_of(two)), 96)
    ranks = [planned_keys(loader_of(cfg_of(two, batch_size=4), r, 2), 48) for r in range(2)]
    for b in range(12):
        assert one[8 * b: 8 * b + 8] == ranks[0][4 * b: 4 * b + 4] + ranks[1][4 * b: 4 * b + 4]


# ------------------------------------------------------------------------------- (b) determinism
@pytest.mark.parametrize("resampled", [False, True])
def test_same_seed_same_order_other_seed_differs(two, resampled):
    first = delivered(loader_of(cfg_of(two, resampled=resampled)), 8)  # 8 batches: over an epoch boundary
    again = delivered(loader_of(cfg_of(two, resampled=resampled)), 8)
    other = delivered(loader_of(cfg_of(two, resampled=resampled, seed=1)), 8)
    assert [k for _, k in first] == [k for _, k in again]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again))  # the same crops too
    assert [k for _, k in first] != [k for _, k in other]


# ------------------------------------------------------------------------------------ (c) resampled
def test_resampled_draws_shards_with_replacement(tmp_path):
    """One path, resampled: an endless stream of whole shards drawn with replacement; some shard comes
    twice before another comes at all, the same for the same seed; no epoch restarts the stream."""
    shards = write_source(tmp_path / "s", "s", 6, 4)
    cfg = DataConfig.from_dict(dict(kind="webdataset", path=shards, resampled=True, loader="pytorch", num_workers=0,
                                    cache_dir=str(tmp_path / "cache"), batch_size=4, drop_last=True))
    keys = planned_keys(loader_of(cfg), 240)
    draws = [keys[i][1:4] for i in range(0, 240, 4)]  # each draw reads one shard whole: 4 samples
    assert all(len({k[1:4] for k in keys[i: i + 4]}) == 1 and len(set(keys[i: i + 4])) == 4 for i in range(0, 240, 4))
    repeat = next(i for i, s in enumerate(draws) if s in draws[:i])  # the first shard drawn a second time
    assert len(set(draws[:repeat])) < 6, draws  # ... while another shard had not come yet
    assert len(set(draws)) == 6 and max(Counter(draws).values()) > 60 // 6  # all come, unevenly
    assert planned_keys(loader_of(cfg), 240) == keys
    late = loader_of(cfg)
    late.set_epoch(7)  # the 8th pass: the stream's samples 168 .. 191, not a restart
    assert planned_keys(late, 24) == keys[168:192]


# ------------------------------------------------------------------------------- (d) resume
@pytest.mark.parametrize("backend, resampled", [("pytorch", True), ("pytorch", False), ("dali", True)])
def test_loader_resumes_mid_epoch_exactly(two, tmp_path, backend, resampled):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = cfg_of(two, backend, resampled=resampled, batch_size=4)
    straight = delivered(loader_of(cfg, 1, 2), 9)  # rank 1 of 2; 6 batches an epoch: resumes in the second
    first = loader_of(cfg, 1, 2)
    head = delivered(first, 8)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain numbers and lists
    assert state["sources"]["global_batch"] == 8 and sum(state["sources"]["consumed"]) == 64
    second = loader_of(cfg, 1, 2)
    second.load_state_dict(state)
    tail = delivered(second, 1)
    assert [k for _, k in head + tail] == [k for _, k in straight]
    if backend == "pytorch":  # the Pillow path crops a sample alike after a resume
        assert torch.equal(tail[0][0], straight[8][0])


def test_dali_and_pytorch_read_the_same_mix(two):
    pytest.importorskip("nvidia.dali")
    for resampled in (False, True):
        dali = delivered(loader_of(cfg_of(two, "dali", resampled=resampled)), 7)
        pillow = delivered(loader_of(cfg_of(two, "pytorch", resampled=resampled)), 7)
        assert [k for _, k in dali] == [k for _, k in pillow]
        assert all(x.shape == (8, 3, 32, 32) for x, _ in dali)


def test_a_mixed_state_and_a_single_path_state_do_not_mix(two):
    single = loader_of(cfg_of(two, path=two["a"]))
    assert single.mix is None and "sources" not in single.state_dict()
    mixed = loader_of(cfg_of(two))
    with pytest.raises(ValueError, match="one data.path"):
        mixed.load_state_dict(single.state_dict() | {"num_samples": mixed.num_samples})
    with pytest.raises(ValueError, match="mixes sources"):
        single.load_state_dict(mixed.state_dict() | {"num_samples": single.num_samples})


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_a_vanished_shard_and_a_broken_image_are_replaced_in_the_mix(tmp_path, backend):
    """A shard deleted after the catalog was built and an image broken after validation: the batches stay
    full, the stand-ins come from the streams after the global batch (the same on every backend), counted."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    a, b = write_source(tmp_path / "a", "a", 2, 12), write_source(tmp_path / "b", "b", 4, 6, seed=2)
    cfg = DataConfig.from_dict(dict(kind="webdataset", sources=[{"path": a, "weight": 3}, {"path": b}], resampled=True,
                                    loader=backend, num_workers=0 if backend == "pytorch" else 1, device="cpu",
                                    cache_dir=str(tmp_path / "cache"), batch_size=8, drop_last=True))
    loader = loader_of(cfg)
    assert any(key.startswith("b002") for key in planned_keys(loader_of(cfg), 96))  # what the deletion takes away
    os.remove(os.path.join(b, "00002.tar"))
    broken = loader.catalog.shard(0)
    row = broken.table[3]
    with open(os.path.join(a, "00000.tar"), "r+b") as f:  # same size: the catalog still points at it
        f.seek(int(row["img_off"]) + 2)
        f.write(b"\x00" * (int(row["img_size"]) - 2))
    with pytest.warns(RuntimeWarning, match="00002.tar is gone from disk"):
        got = delivered(loader, 12)
    assert all(len(k) == 8 and x.shape[0] == 8 for x, k in got)
    keys = [key for _, k in got for key in k]
    assert not any(key.startswith("b002") for key in keys)
    runtime = loader.stats["runtime"]
    assert runtime["vanished_shards"] == 1 and runtime["replaced"] >= 1, runtime
    if backend == "pytorch":
        assert runtime["decode_error"] >= 1 and broken.keys[3] not in keys, runtime


def test_a_missing_source_is_named_by_its_key(tmp_path, two):
    cfg = cfg_of(two, sources=[{"path": two["a"]}, {"path": str(tmp_path / "nowhere" / "*.tar")}])
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.path"):
        loader_of(cfg)


def test_skips_are_counted_per_shard_across_sources(tmp_path):
    """Two sources whose shards share file names: the skips name the shard by path where names clash."""
    a, b = write_source(tmp_path / "a", "a", 2, 6), write_source(tmp_path / "b", "b", 3, 6, seed=4)
    _plant_corrupt(os.path.join(b, "00001.tar"), n_bad=2, n_empty=1)
    _plant_corrupt(os.path.join(b, "00002.tar"), n_bad=1, n_empty=0)
    loader = loader_of(DataConfig.from_dict(dict(kind="webdataset", sources=[{"path": a}, {"path": b}], loader="pytorch",
                                                 num_workers=0, cache_dir=str(tmp_path / "cache"), batch_size=4)))
    by_shard = loader.stats["skipped_by_shard"]
    assert by_shard == {os.path.join(b, "00001.tar"): {"corrupt_image": 2, "empty_caption": 1},
                        "00002.tar": {"corrupt_image": 1}}, by_shard


# --------------------------------------------------------------------------- (d) through the trainer
SOURCES = dict(batch={"global_size": 8, "micro_size": 4}, max_steps=6, schedule={"warmup_steps": 1, "total_steps": 6})


def _sections(shards, tmp, **extra):
    data = {"kind": "webdataset", "loader": "pytorch", "num_workers": 0, "cache_dir": str(tmp / "cache"),
            "sources": [{"path": shards["a"], "weight": 3}, {"path": shards["b"], "weight": 1}], "resampled": True}
    return _merge(SOURCES, {"data": data, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_rank):
    """Two sources (b with planted bad samples), resampled: 6 steps straight, and 3 steps then --resume auto."""
    tmp = tmp_path_factory.mktemp("mixed-runs")
    shards = {"a": str(tmp / "a"), "b": str(tmp / "b")}
    _write_shards(shards["a"], n_shards=2, per_shard=12)
    write_source(shards["b"], "b", 2, 12, seed=7)
    _plant_corrupt(os.path.join(shards["b"], "00001.tar"), n_bad=2, n_empty=1)
    straight = write_config(tmp, "straight", **_sections(shards, tmp))
    assert run_main(straight) == 0
    resumed = write_config(tmp, "resumed", **_sections(shards, tmp, checkpointing={"every_steps": 3, "save_final": False}))
    assert run_main(resumed, "--max-steps", "3") == 0
    assert run_main(resumed, "--resume", "auto") == 0
    return tmp, shards


def test_mixed_resampled_run_resumes_to_the_straight_losses(trained):
    tmp, shards = trained
    a, b = read_metrics(tmp / "straight"), read_metrics(tmp / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert_losses_close(a, b)
    state = torch.load(tmp / "resumed" / "checkpoints" / "step_000003" / "trainer_rank0.pt", weights_only=True)
    assert state["data"]["sources"] == {"global_batch": 3, "consumed": state["data"]["sources"]["consumed"],
                                        "weights": [3.0, 1.0], "resampled": True}
    assert sum(state["data"]["sources"]["consumed"]) == 24
    wa, wb = read_weights(tmp / "straight"), read_weights(tmp / "resumed")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    # the run's resolved config lists the sources' paths under data.path, and loads again as it is
    config = yaml.safe_load((tmp / "straight" / "config.yaml").read_text())
    assert config["data"]["path"] == [shards["a"], shards["b"]] and len(config["data"]["sources"]) == 2
    from clipforge.train.config import TrainConfig

    assert TrainConfig.from_dict(config).data.sources == config["data"]["sources"]
    # skipped samples still counted by shard (both sources hold a 00001.tar: named by path)
    summary = json.loads((tmp / "straight" / "summary.json").read_text())
    assert summary["data"]["skipped_by_shard"] == {os.path.join(shards["b"], "00001.tar"): summary["data"]["skipped"]}
    assert sum(summary["data"]["skipped"].values()) == 3


def test_two_ranks_of_mixed_sources_equal_one_process(trained):
    """The mixed global batches do not depend on the number of ranks: 2 ranks train as 1 process."""
    tmp, shards = trained
    config = write_config(tmp, "two-ranks", **_sections(shards, tmp))
    run_two_ranks(config)
    assert_losses_close(read_metrics(tmp / "straight"), read_metrics(tmp / "two-ranks"))


# ------------------------------------------------------------------- (e) refused before the start
def _sources(*items) -> str:
    return "data.sources=[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in i.items()) + "}" for i in items) + "]"


WDS = ["data.kind=webdataset", "data.loader=pytorch", "data.num_workers=0"]

# name -> (--set overrides given (root, shards), what the one stderr line must name)
CASES = {
    "path_and_sources": (lambda r, s: WDS + [f"data.path={s}", _sources({"path": s})], ["'data.path'", "'data.sources'"]),
    "unknown_source_key": (lambda r, s: WDS + [_sources({"path": s}, {"path": s, "wieght": 2})],
                           ["'data.sources[1].wieght'", "path, weight"]),
    "weight_zero": (lambda r, s: WDS + [_sources({"path": s, "weight": 0})], ["'data.sources[0].weight'", "positive"]),
    "weight_negative": (lambda r, s: WDS + [_sources({"path": s}, {"path": s, "weight": -1})],
                        ["'data.sources[1].weight'", "positive"]),
    "weight_nan": (lambda r, s: WDS + [_sources({"path": s, "weight": ".nan"})], ["'data.sources[0].weight'", "finite"]),
    "weight_text": (lambda r, s: WDS + [_sources({"path": s, "weight": "three"})], ["'data.sources[0].weight'"]),
    "source_without_path": (lambda r, s: WDS + [_sources({"weight": 2})], ["'data.sources[0].path'", "required"]),
    "sources_not_a_list": (lambda r, s: WDS + [f"data.sources={s}"], ["'data.sources'", "list"]),
    "missing_source": (lambda r, s: WDS + [_sources({"path": s}, {"path": f"{r}/nowhere"})],
                       ["data.sources[1].path", "nowhere"]),
    "empty_source": (lambda r, s: WDS + [_sources({"path": s}, {"path": f"{r}/empty.tar"})],
                     ["'data.sources[1].path'", "empty.tar", "no sample"]),
    "missing_openclip_part": (lambda r, s: WDS + [f"data.path={s}::{r}/nowhere"], ["data.path", "nowhere"]),
    "factors_count": (lambda r, s: WDS + [f"data.path={s}::{s}", "data.upsampling_factors=[1]"],
                      ["'data.upsampling_factors'", "2 sources"]),
    "factors_one_path": (lambda r, s: WDS + [f"data.path={s}", "data.upsampling_factors=[3, 1]"],
                         ["'data.upsampling_factors'", "'::'"]),
    "factors_with_sources": (lambda r, s: WDS + [_sources({"path": s}), "data.upsampling_factors=[1]"],
                             ["'data.upsampling_factors'", "data.sources[i].weight"]),
    "factor_negative": (lambda r, s: WDS + [f"data.path={s}::{s}", "data.upsampling_factors=[1, -2]"],
                        ["'data.upsampling_factors[1]'"]),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every case through clipforge.train's main in one subprocess (test_preflight's probe)."""
    tmp = tmp_path_factory.mktemp("refusals")
    shards, config = probe_inputs(tmp)
    cases = []
    for name, (sets, _) in CASES.items():
        root = tmp / name
        root.mkdir()
        write_tar(root / "empty.tar", 0)
        argv = ["--config", str(config), "--output-dir", str(root / "out")]
        for item in sets(str(root), str(shards)):
            argv += ["--set", item]
        cases.append({"name": name, "argv": argv, "block": [], "env": {}, "out": str(root / "out")})
    return run_probe(tmp, cases)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_sources_are_refused_before_anything_starts(refusals, name):
    row = refusals[name]
    lines = row["stderr"].splitlines()
    assert row["rc"] == 2, row["stderr"]
    assert len(lines) == 1 and lines[0].startswith("clipforge train: "), row["stderr"]
    for word in CASES[name][1]:
        assert word in lines[0], (word, lines[0])
    assert row["deepspeed"] is False and row["group"] is False and row["out"] is None

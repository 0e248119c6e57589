"""`clipforge plan`: its memory terms against real CPU runs, its arithmetic, its run config and errors.

The activation term is checked against a real forward on CPU: a saved-tensor hook sums the storages
autograd keeps for backward (each storage once, parameters excluded), which is the activation memory
held between forward and backward. The model-state term is checked against the real tensors of a
torch.optim.AdamW step.
"""
import json

import pytest
import torch
import yaml

import clipforge
from clipforge.train import plan as planner
from clipforge.train.config import TrainConfig

REL = 0.15  # the bound: the planner's terms within 15% of the measured ones


@pytest.fixture(scope="module")
def traces():
    cache = {}

    def get(name, precision="fp32"):
        if (name, precision) not in cache:
            cache[(name, precision)] = planner.trace_model(name, precision)
        return cache[(name, precision)]

    return get


def measured_saved_bytes(model, images, tokens) -> int:
    """Bytes of the tensors autograd saves in a real forward (storages once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        img, txt, scale = model(images, tokens)
    (img.sum() + txt.sum() + scale).backward()  # the graph is usable: these are real saved tensors
    return sum(saved.values())


def batch_for(model, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = model.image_size
    images = torch.randn(n, 3, r, r, generator=g).to(dtype)
    tokens = torch.randint(1, 49000, (n, model.context_length), generator=g)
    tokens[:, 9] = 49407  # the end-of-text token, mid-sequence
    return images, tokens


def _close(predicted, measured):
    assert abs(predicted - measured) <= REL * measured, (
        f"planner {predicted / 2**20:.3f} MiB vs measured {measured / 2**20:.3f} MiB "
        f"({(predicted - measured) / measured:+.1%})")


@pytest.mark.parametrize("name,micro", [("tiny-vit", 7), ("tiny-rn", 3), ("small-vit", 3)])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_activations_match_a_real_cpu_run(traces, name, micro, ckpt):
    torch.manual_seed(0)
    model = clipforge.create_model(name, grad_checkpointing=ckpt).train()
    measured = measured_saved_bytes(model, *batch_for(model, micro))
    t = traces(name)
    if ckpt:  # what stays stored between forward and backward; the recomputed block comes on top
        predicted = t.ckpt_fixed + micro * t.ckpt_per_sample
        assert t.block_per_sample > 0
    else:
        predicted = planner.activation_bytes(t, micro, ckpt=False)
    _close(predicted, measured)


def test_bf16_activations_match_a_real_cpu_run(traces):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").to(torch.bfloat16).train()
    measured = measured_saved_bytes(model, *batch_for(model, 5, torch.bfloat16))
    _close(planner.activation_bytes(traces("tiny-vit", "bf16"), 5, ckpt=False), measured)


@pytest.mark.parametrize("name", ["tiny-vit", "small-vit"])
def test_model_states_match_a_real_adamw_step(traces, name):
    model = clipforge.create_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    img, txt, scale = model(*batch_for(model, 2))
    clipforge.contrastive_loss(img, txt, scale).backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    p_b, g_b, o_b, buckets = planner.state_bytes(traces(name).params, "fp32", zero=0, world=1)
    assert traces(name).params == clipforge.model.num_parameters(model)
    assert (p_b, g_b, buckets) == (weights, grads, 0)
    _close(o_b, moments)


def test_zero_stages_partition_states():
    p = 1_000_003
    full = planner.state_bytes(p, "bf16", 0, 8)
    assert full[:3] == (2 * p, 2 * p, 12 * p)
    assert planner.state_bytes(p, "bf16", 1, 8)[:3] == (2 * p, 2 * p, 12 * p / 8)
    assert planner.state_bytes(p, "bf16", 2, 8)[:3] == (2 * p, 2 * p / 8, 12 * p / 8)
    assert planner.state_bytes(p, "bf16", 3, 8)[:3] == (2 * p / 8, 2 * p / 8, 12 * p / 8)
    # ZeRO 3 gathers the weights for every forward: more traffic than ZeRO 1
    z1 = planner.comm_bytes(p, "bf16", 1, 8, 4, 4096, 512, True)
    z3 = planner.comm_bytes(p, "bf16", 3, 8, 4, 4096, 512, True)
    assert z3 > 4 * z1 / 2 and planner.comm_bytes(p, "bf16", 1, 1, 4, 4096, 512, True) == 0


def test_locked_towers_are_counted_as_the_trainer_locks_them(traces, tmp_path, capsys):
    """LiT: the planner's trainable count is what the trainer's lock leaves trainable (real model, AdamW
    states of the trainable parameters only); gradients, optimizer states and their traffic shrink with
    it, the weights and ZeRO 3's weight gathers do not; the CLI writes the lock keys."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.finetune import lock_towers

    locks = {"lock_image": True, "lock_image_unlocked_groups": 1, "lock_text": True, "lock_text_unlocked_groups": 2}
    model = clipforge.create_model("tiny-vit")
    lock_towers(model, TrainConfig.from_dict({"model": locks}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    img, txt, scale = model(*batch_for(model, 2))
    clipforge.contrastive_loss(img, txt, scale).backward()
    opt.step()
    moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    t = planner.trainable_params("tiny-vit", locks)
    assert t == sum(p.numel() for p in model.parameters() if p.requires_grad) < traces("tiny-vit").params // 4
    p_all = traces("tiny-vit").params
    p_b, g_b, o_b, _ = planner.state_bytes(p_all, "fp32", 0, 1, t)
    assert (p_b, g_b) == (4 * p_all, 4 * t)
    _close(o_b, moments)
    for zero in (0, 2, 3):
        full = planner.comm_bytes(p_all, "bf16", zero, 8, 4, 4096, 512, True)
        lit = planner.comm_bytes(p_all, "bf16", zero, 8, 4, 4096, 512, True, t)
        assert lit < full and (zero < 3 or lit > 0.6 * full)  # ZeRO 3 still gathers every weight
    plan = planner.make_plan("tiny-vit", "A100-40GB", 2, 64, trace=traces("tiny-vit", "bf16"), locks=locks)
    assert plan.trainable == t and f"({t / 1e6:.1f} M trainable" in planner.format_plan(plan)
    out = tmp_path / "lit.yaml"
    assert planner.main(["--model", "tiny-vit", "--gpu", "A100-40GB", "--gpus", "2", "--batch", "64",
                         "--lock-image", "1", "--lock-text", "2", "--write-config", str(out)]) == 0
    assert "--lock-image 1 --lock-text 2" in out.read_text()
    assert {k: v for k, v in TrainConfig.load(str(out)).to_dict()["model"].items() if k.startswith("lock")} == {
        **locks, "lock_image_freeze_norm": False, "lock_text_freeze_norm": False}


def test_largest_micro_batch_is_the_largest_that_fits(traces):
    t = traces("tiny-vit", "bf16")
    # an absurd batch on a small GPU so that the activation term decides
    plan = planner.make_plan("tiny-vit", "V100-16GB", 2, 2**20, "fp16", zero=1, trace=t)
    local = plan.local
    for ckpt in (False, True):
        m = plan.max_micro[(1, ckpt)]
        assert m and local % m == 0
        opt = next(o for o in plan.options if o.zero == 1 and o.ckpt == ckpt and o.micro == m)
        assert opt.memory.total <= plan.capacity
        bigger = next((d for d in range(m + 1, local + 1) if local % d == 0), None)
        if bigger is not None:
            p_b, g_b, o_b, bk = planner.state_bytes(t.params, "fp16", 1, 2)
            over = p_b + g_b + o_b + bk + planner.activation_bytes(t, bigger, ckpt) + planner.loss_bytes(
                local, plan.batch, plan.embed)
            assert over > plan.capacity
    assert plan.max_micro[(1, True)] > plan.max_micro[(1, False)]
    assert plan.best.steps == local // plan.best.micro


def test_reference_setup_and_run_config(tmp_path, traces, capsys):
    t = traces("ViT-B-32", "bf16")
    plan = planner.make_plan("ViT-B-32", "A100-40GB", 8, 32768, trace=t)
    assert plan.precision == "bf16" and plan.local == 4096
    assert plan.best is not None and plan.best.memory.total <= plan.capacity
    assert 140e6 < t.params < 160e6  # ViT-B/32 CLIP: 151 M parameters
    data = planner.run_config(plan, "/data/shards/{00000..00009}.tar")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = TrainConfig.load(str(path))
    assert cfg.validate(8) == plan.best.steps
    assert (cfg.batch.micro_size, cfg.deepspeed.zero_stage, cfg.model.grad_checkpointing) == (
        plan.best.micro, plan.best.zero, plan.best.ckpt)
    text = planner.format_plan(plan)
    assert "recommended: ZeRO" in text and "largest micro-batch" in text


def test_measured_mfu_is_read_from_benchmark_json(tmp_path):
    bench = {"benchmarks": [{"name": "test_train_step[ViT-B-32-clipforge]", "extra_info": {
        "provider": "clipforge", "mfu": 0.37, "device": "NVIDIA H100 80GB HBM3"}}]}
    (tmp_path / "gpu.json").write_text(json.dumps(bench))
    assert planner.measured_mfu("H100-80GB", str(tmp_path))[0] == 0.37
    assert planner.measured_mfu("A100-40GB", str(tmp_path)) is None
    # Several runs: the model's own best measurement, else the best of any model's.
    rows = [("ViT-B-32", 0.37), ("ViT-L-14", 0.45), ("ViT-B-32", 0.41), ("ViT-B-32", 0.30)]
    bench = {"benchmarks": [{"name": f"run{i}", "extra_info": {"provider": "clipforge", "mfu": m, "preset": p,
                                                               "device": "NVIDIA H100 80GB HBM3"}}
                            for i, (p, m) in enumerate(rows)]}
    (tmp_path / "gpu.json").write_text(json.dumps(bench))
    assert planner.measured_mfu("H100-80GB", str(tmp_path), "ViT-B-32") == (0.41, "gpu.json: run2")
    assert planner.measured_mfu("H100-80GB", str(tmp_path), "RN50")[0] == 0.45
    # a file named directly; nothing is read without a name; a named path that is not there is refused
    assert planner.measured_mfu("H100-80GB", str(tmp_path / "gpu.json"), "ViT-B-32") == (0.41, "gpu.json: run2")
    assert planner.measured_mfu("H100-80GB", None) is None
    with pytest.raises(planner.PlanError, match="no such file or folder"):
        planner.measured_mfu("H100-80GB", str(tmp_path / "missing.json"))


def test_measured_rates_come_only_from_the_arguments(tmp_path, monkeypatch, capsys):
    """A results folder in the working directory (as in a checkout) is never read unless named."""
    bench = {"benchmarks": [{"name": "test_train_step[tiny-vit]", "extra_info": {
        "provider": "clipforge", "mfu": 0.37, "preset": "tiny-vit", "device": "NVIDIA H100 80GB HBM3"}}]}
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "gpu.json").write_text(json.dumps(bench))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny-vit", "--gpu", "H100-80GB", "--gpus", "2", "--batch", "96"]

    def achievable(*extra):
        assert planner.main([*argv, *extra]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "achievable" in line)

    assert "x 40% achievable (assumed: no --mfu or --results given)" in achievable()
    assert "x 37% achievable (measured (gpu.json: test_train_step[tiny-vit]))" in achievable("--results", str(results))
    assert "x 37% achievable (measured" in achievable("--results", str(results / "gpu.json"))
    assert "x 50% achievable (given with --mfu)" in achievable("--mfu", "0.5", "--results", str(results))
    assert "x 35% achievable (assumed: no train-step measurement on V100" in achievable(
        "--gpu", "V100-32GB", "--precision", "fp16", "--results", str(results))
    assert planner.main([*argv, "--results", str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_meta_attention_saves_what_a_fused_kernel_saves():
    """ops.attention on meta tensors (the planner's trace) keeps q, k, v, out and the (B, H, L) log-sum-exps,
    never an L x L matrix, whichever backend is asked for; the planner needs no patching for it."""
    from clipforge import ops

    b, h, n, d = 2, 4, 50, 16
    for backend in ("auto", "sdpa", "torch"):
        q, k, v = (torch.empty(b, h, n, d, device="meta", requires_grad=True) for _ in range(3))
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = ops.attention(q, k, v, causal=True, backend=backend)
        assert out.shape == (b, h, n, d) and out.device.type == "meta"
        assert sorted(shapes) == sorted([(b, h, n, d)] * 4 + [(b, h, n)]), shapes
        assert out.transpose(1, 2).is_contiguous()  # laid out (B, L, H, d), as the kernels write it
        assert planner._graph_attention_flops([out]) == 4 * b * h * n * n * d // 2
    assert "unittest" not in open(planner.__file__).read()


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "A100-40GB", "--gpus", "3", "--batch", "32768"], "divisible"),
    (["--gpu", "V100-32GB", "--gpus", "8", "--batch", "64", "--precision", "bf16"], "no bf16"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert planner.main(["--model", "tiny-vit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_writes_a_loadable_run_config(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert planner.main(["--model", "tiny-vit", "--gpu", "H100-80GB", "--gpus", "2", "--batch", "96",
                         "--write-config", str(out)]) == 0
    cfg = TrainConfig.load(str(out))
    assert cfg.precision.dtype == "bf16" and cfg.batch.global_size == 96
    assert "recommended" in capsys.readouterr().out


def test_bigg_plan_and_shipped_run_config(traces):
    """ViT-bigG-14 (OpenCLIP's shapes) at 32,768 on 64 A100-80GB: `--zero 3` fits with one 512-pair
    forward per GPU, and configs/vit-bigg-14-32k-64xa100.yaml is that plan and validates at world size 64."""
    import os

    t = traces("ViT-bigG-14", "bf16")
    assert t.params == 2_539_567_105  # open_clip.create_model("ViT-bigG-14")'s count (tests/test_presets.py)
    plan = planner.make_plan("ViT-bigG-14", "A100-80GB", 64, 32768, zero=3, trace=t)
    b = plan.best
    assert b is not None and b.zero == 3 and b.memory.total <= plan.capacity
    assert (b.micro, b.steps, b.ckpt) == (512, 1, True)
    assert plan.max_micro[(3, False)] < 512  # without checkpointing it would need gradient caching
    # the automatic pick fits too (the planner rates ZeRO 2 marginally faster: fewer bytes moved)
    auto = planner.make_plan("ViT-bigG-14", "A100-80GB", 64, 32768, trace=t)
    assert auto.best is not None and auto.best.memory.total <= auto.capacity
    assert abs(auto.best.step_s - b.step_s) <= 0.05 * b.step_s
    assert "recommended: ZeRO 2" in planner.format_plan(auto)
    assert "recommended: ZeRO 3" in planner.format_plan(plan)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = TrainConfig.load(os.path.join(root, "configs", "vit-bigg-14-32k-64xa100.yaml"))
    assert cfg.validate(64) == b.steps
    assert cfg.model.name == "ViT-bigG-14" and cfg.batch.global_size == 32768 and cfg.precision.dtype == "bf16"
    assert (cfg.batch.micro_size, cfg.deepspeed.zero_stage, cfg.model.grad_checkpointing) == (b.micro, 3, b.ckpt)
    ds = cfg.deepspeed_config(64)
    assert ds["train_batch_size"] == 32768 and ds["zero_optimization"]["stage"] == 3


def test_bigg_auto_plan_is_zero2_and_the_zero3_plan_fits(traces):
    """The automatic pick is the fastest plan that fits: for bigG at 32,768 on 64 A100-80GB, ZeRO 2, since
    ZeRO 3 gathers the weights in forward and backward (~1.5x the bytes); `--zero 3` fits as well, with the
    same 512-pair micro-batch, and holds 4.7 GiB less of weights per GPU."""
    t = traces("ViT-bigG-14", "bf16")
    auto = planner.make_plan("ViT-bigG-14", "A100-80GB", 64, 32768, trace=t)
    z3 = planner.make_plan("ViT-bigG-14", "A100-80GB", 64, 32768, zero=3, trace=t)
    a, b = auto.best, z3.best
    assert (a.zero, a.micro, a.steps, a.ckpt) == (2, 512, 1, True) and a.memory.total <= auto.capacity
    assert (b.zero, b.micro, b.steps, b.ckpt) == (3, 512, 1, True) and b.memory.total <= z3.capacity
    assert z3.max_micro[(3, True)] >= 512 and z3.max_micro[(3, False)] < 512
    # the ZeRO-3 plan is among the automatic plan's options, slower only by its extra communication
    same = [o for o in auto.options if (o.zero, o.micro, o.ckpt) == (3, 512, True)]
    assert len(same) == 1 and same[0].step_s == pytest.approx(b.step_s) and a.step_s < b.step_s
    assert a.compute_s == pytest.approx(b.compute_s) and b.comm_s > 1.4 * a.comm_s

    def comm(o):
        return planner.comm_bytes(t.params, "bf16", o.zero, 64, o.steps, 32768, auto.embed, o.steps > 1)

    assert 1.4 < comm(b) / comm(a) < 1.6
    # ...and it needs less memory per GPU: weights sharded 64 ways (4.73 -> 0.07 GiB), smaller buckets
    GiB = 1024**3
    assert round(a.memory.params / GiB, 2) == 4.73 and round(b.memory.params / GiB, 2) == 0.07
    assert b.memory.total < a.memory.total - 5 * GiB
    assert a.memory.activations == b.memory.activations


def test_shipped_bigg_config_is_what_the_zero3_plan_writes(tmp_path, capsys, monkeypatch, traces):
    """configs/vit-bigg-14-32k-64xa100.yaml: its model, batch and deepspeed sections are what
    `clipforge plan ... --zero 3 --write-config` writes (the data path may differ), and its header says so."""
    import os

    monkeypatch.setattr(planner, "trace_model", lambda name, precision="fp32": traces(name, precision))  # traced once
    out = tmp_path / "bigg.yaml"
    argv = ["--model", "ViT-bigG-14", "--gpu", "A100-80GB", "--gpus", "64", "--batch", "32768", "--zero", "3"]
    assert planner.main(argv + ["--write-config", str(out)]) == 0
    assert "recommended: ZeRO 3" in capsys.readouterr().out
    text = out.read_text()
    # the written header names the command that writes the file again, --zero included
    assert text.splitlines()[0].startswith("# written by: clipforge plan " + " ".join(argv[:8]))
    assert " --zero 3 " in text.splitlines()[0]
    written = yaml.safe_load(text)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped_text = open(os.path.join(root, "configs", "vit-bigg-14-32k-64xa100.yaml")).read()
    shipped = yaml.safe_load(shipped_text)
    for section in ("model", "batch", "deepspeed"):
        assert shipped[section] == written[section], section
    assert shipped["deepspeed"]["zero_stage"] == 3 and shipped["batch"]["micro_size"] == 512
    assert "clipforge plan --model ViT-bigG-14 --gpu A100-80GB --gpus 64 --batch 32768 --zero 3" in shipped_text

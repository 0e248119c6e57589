"""Samples/s and peak memory of one full training step: clipforge against an OpenCLIP-style baseline.

Run: pytest benchmarks/bench_train_step.py --benchmark-only [--benchmark-json out.json]

One step = forward, contrastive loss over the whole batch, backward, AdamW update; the data is excluded
(images and tokens are already in memory, on the device).
- clipforge: `clipforge.train.trainer.Trainer` in one process (DeepSpeed ZeRO 0, torch AdamW with the
  trainer's parameter groups, gradient clipping off as in the baseline), i.e. clipforge's model,
  gradient caching over micro-batches (when the micro-batch is smaller than the batch) and
  `clipforge.contrastive_loss` (C++ tiles on CPU, Triton on GPU). `Trainer.train_step` is timed as is.
- openclip: OpenCLIP 3.3.0's `CLIP` model with the same sizes (QuickGELU, as the preset), its
  `ClipLoss`, plain `torch.optim.AdamW` (decay off for gains and biases, as OpenCLIP's main does), the
  logit-scale clamp of OpenCLIP's training loop; one forward over the whole batch, no caching. On GPU
  it runs under bf16 autocast (OpenCLIP's `--precision amp_bf16`); clipforge runs DeepSpeed's bf16.

Cases: on CPU (fp32) the small preset at equal work (batch 64, one forward each) and the tiny preset at
a contrastive batch of 4,096 (clipforge: 16 gradient-caching micro-batches of 256; the baseline: one
forward of 4,096). On a GPU: ViT-B/32, 256 per GPU, bf16, with model FLOPs utilisation
(3 x forward FLOPs of the batch, counted by clipforge.train.plan's meta trace, over time x peak bf16 FLOP/s).

Patch dropout (FLIP, model.patch_dropout p): clipforge's step on small-vit (64 patches), batch 64, one forward,
at p = 0, 0.5 and 0.75 (`test_cpu_train_step_patch_dropout`); the image tower runs int(64 (1 - p)) + 1 tokens.

Memory: CPU: the peak resident set during the timed steps (Linux VmHWM, reset after the warm-up step,
so it is this case's peak, model and process included) and the resting RSS before them; GPU:
`torch.cuda.max_memory_allocated` over the timed steps. extra_info carries samples/s and both.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from common import roofline, shim_torchvision

CPU_CASES = [  # (preset, contrastive batch, clipforge micro-batch)
    ("small-vit", 64, 64),
    ("tiny-vit", 4096, 256),
]
GPU_CASES = [("ViT-B-32", 256, 256)]
PROVIDERS = ["clipforge", "openclip"]
LR = 5e-4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _inputs(cfg, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = cfg.vision.image_size
    images = torch.randn(batch, 3, r, r, generator=g)
    tokens = torch.randint(1, 49000, (batch, cfg.text.context_length), generator=g)
    lengths = torch.randint(5, cfg.text.context_length, (batch,), generator=g)
    tokens[torch.arange(batch), lengths] = 49407  # end of text (the highest id), padding after it
    tokens[torch.arange(cfg.text.context_length)[None] > lengths[:, None]] = 0
    return images.to(device), tokens.to(device)


# ------------------------------------------------------------------------------------- providers
class _NoData:
    """The trainer's data source is unused: every step is handed its batch."""

    def state_dict(self):
        return {}


def _clipforge_step(preset: str, batch: int, micro: int, precision: str, images, tokens, patch_dropout: float = 0.0):
    from clipforge.train.distributed import init_distributed
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    init_distributed()
    cfg = TrainConfig.from_dict({
        "model": {"name": preset, "patch_dropout": patch_dropout},
        "batch": {"global_size": batch, "micro_size": micro},
        "optimizer": {"impl": "torch", "lr": LR, "weight_decay": 0.2, "grad_clip": 0.0},
        "schedule": {"warmup_steps": 0, "total_steps": 10_000},
        "precision": {"dtype": precision},
        "deepspeed": {"zero_stage": 0},
        "checkpointing": {"every_steps": 0, "save_final": False},
        "logging": {"tensorboard": False, "progress_bar": False, "plot": False},
        "max_steps": 10_000,
    })
    trainer = Trainer(cfg, data=_NoData())

    def step():
        metrics = trainer.train_step((images, tokens))
        assert metrics["loss"] is not None and math.isfinite(metrics["loss"])

    return step


def _openclip_model(preset: str):
    from open_clip.model import CLIP as OpenCLIPModel

    from clipforge.model.config import get_preset

    cfg = get_preset(preset)
    v, t = cfg.vision, cfg.text
    vision = dict(image_size=v.image_size, layers=v.layers, width=v.width, patch_size=v.patch_size,
                  head_width=v.width // v.num_heads, mlp_ratio=v.mlp_ratio)
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_ratio)
    return OpenCLIPModel(cfg.embed_dim, vision, text, quick_gelu=cfg.quick_gelu)


def _openclip_step(preset: str, precision: str, images, tokens):
    from open_clip.loss import ClipLoss

    model = _openclip_model(preset).to(images.device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            img, txt, scale = model(images, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        assert math.isfinite(float(loss))

    return step


def _make_step(provider, preset, batch, micro, precision, device, patch_dropout: float = 0.0):
    shim_torchvision()  # before DeepSpeed or open_clip import torchvision
    pytest.importorskip("deepspeed")
    if provider == "openclip":
        pytest.importorskip("open_clip")
    from clipforge.model.config import get_preset

    images, tokens = _inputs(get_preset(preset), batch, device)
    if provider == "clipforge":
        return _clipforge_step(preset, batch, micro, precision, images, tokens, patch_dropout)
    return _openclip_step(preset, precision, images, tokens)


# ------------------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset,batch,micro", CPU_CASES, ids=[f"{p}-{b}" for p, b, _ in CPU_CASES])
def test_cpu_train_step(benchmark, preset, batch, micro, provider):
    step = _make_step(provider, preset, batch, micro, "fp32", torch.device("cpu"))
    step()  # warm-up: first-call allocations, the optimizer states
    resting_kib = _status_kib("VmRSS")
    _reset_peak_rss()
    benchmark.pedantic(step, rounds=2, iterations=1)
    peak_kib = _status_kib("VmHWM")
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "device": "cpu", "preset": preset, "provider": provider, "precision": "fp32", "batch": batch,
        "micro_batch": micro if provider == "clipforge" else batch, "seconds": seconds,
        "samples_per_s": batch / seconds, "peak_rss_mb": peak_kib / 1024, "resting_rss_mb": resting_kib / 1024,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    })
    print(json.dumps(benchmark.extra_info))


PATCH_DROPOUT_CASE = ("small-vit", 64, 64)  # (preset, batch, micro-batch): one forward, as the CPU case above


@pytest.mark.parametrize("p", [0.0, 0.5, 0.75], ids=lambda p: f"p{p}")
def test_cpu_train_step_patch_dropout(benchmark, p):
    """clipforge's train step with FLIP patch dropout p; extra_info adds the image tokens and the model's
    forward FLOPs per sample at that p (clipforge.train.plan's meta trace), to set the speed-up against."""
    from clipforge.train.plan import trace_model

    preset, batch, micro = PATCH_DROPOUT_CASE
    step = _make_step("clipforge", preset, batch, micro, "fp32", torch.device("cpu"), patch_dropout=p)
    step()  # warm-up
    benchmark.pedantic(step, rounds=5, iterations=1)
    seconds = benchmark.stats.stats.min
    from clipforge.model.config import get_preset

    v = get_preset(preset).vision
    patches = (v.image_size // v.patch_size) ** 2
    benchmark.extra_info.update({
        "device": "cpu", "preset": preset, "provider": "clipforge", "precision": "fp32", "batch": batch,
        "micro_batch": micro, "patch_dropout": p, "image_tokens": 1 + max(1, int(patches * (1 - p))),
        "forward_gflops_per_sample": trace_model(preset, "fp32", {"vision": {"patch_dropout": p}}).flops_per_sample / 1e9,
        "seconds": seconds, "samples_per_s": batch / seconds, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    })
    print(json.dumps(benchmark.extra_info))


def _peak_tflops(device_name: str) -> float | None:
    from clipforge.train.plan import spec_for_device

    found = spec_for_device(device_name)
    return found[1].peak_tflops.get("bf16") if found else None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset,batch,micro", GPU_CASES, ids=[f"{p}-{b}" for p, b, _ in GPU_CASES])
def test_cuda_train_step(benchmark, preset, batch, micro, provider):
    from clipforge.train.plan import trace_model

    dev = torch.device("cuda")
    inner = _make_step(provider, preset, batch, micro, "bf16", dev)

    def step():
        inner()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10, iterations=1)
    seconds = benchmark.stats.stats.median
    name = torch.cuda.get_device_name()
    peak = _peak_tflops(name)
    model_flops = 3 * trace_model(preset, "bf16").flops_per_sample * batch
    benchmark.extra_info.update({
        "device": name, "preset": preset, "provider": provider, "precision": "bf16", "batch": batch,
        "micro_batch": micro if provider == "clipforge" else batch, "seconds": seconds,
        "samples_per_s": batch / seconds, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
        "model_tflops": model_flops / seconds / 1e12,
        "mfu": model_flops / seconds / (peak * 1e12) if peak else None, "torch": torch.__version__,
        # the compute roofline of the step (weights and activations re-read are not counted): its fraction
        # is the MFU
        **roofline(model_flops, 0, seconds, "bf16"),
    })
    print(json.dumps(benchmark.extra_info))

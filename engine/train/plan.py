"""`clipforge plan`: memory per GPU, the largest micro-batch, communication and step time for a cluster.

    clipforge plan --model ViT-B-32 --gpu A100-40GB --gpus 8 --batch 32768 [--precision bf16] [--zero 1]
                   [--mfu 0.38 | --results benchmarks/results]

How each term is obtained (and what is assumed):
- Parameters P: counted exactly on a model built on the meta device (no memory, no weights).
- Model states per GPU, ZeRO paper (Rajbhandari et al. 2020, sec. 5) with K bytes of optimizer state per
  parameter: fp32 training keeps 4P weights + 4P gradients + 8P Adam moments (K = 8); bf16 / fp16 keep
  2P weights + 2P gradients + K = 12 (fp32 master weights and both moments). Stage 1 divides the
  optimizer states by the W ranks, stage 2 also the gradients, stage 3 also the weights. DeepSpeed's
  communication buckets are added (reduce bucket for stages 1-2, prefetch bucket for stage 3, at the
  trainer's defaults), in the weights' dtype.
- Activations: what autograd saves for backward in a forward of one micro-batch, traced on the meta
  device with a saved-tensor hook (storages counted once, parameters excluded). On meta tensors
  `ops.attention` takes its planning path, a stand-in that saves what every fused kernel the engine runs
  (Triton on sm80+, xformers / SDPA-efficient on V100, SDPA-flash on CPU) saves: q, k, v, the output and
  the row log-sum-exps, never the S x S probabilities of SDPA's math path.
  With activation checkpointing the stored part is each block's input, and backward adds one block's
  recomputed activations at a time (the largest block is counted). The saved-tensor totals are
  checked against real CPU runs of the tiny and small presets in tests/test_plan.py.
- Locked towers (LiT, `--lock-image K` / `--lock-text K`): gradients, optimizer states and their traffic
  count the trainable parameters only; activations and FLOPs are a trainable model's (an upper bound).
- Loss buffers (gradient caching): this rank's image and text features in fp32 and their gradients,
  the gathered text features of the global batch and their gradient (clipforge.contrastive_loss works
  tile by tile: no N x N buffer), and the 2N log-sum-exps. For contrast, OpenCLIP's ClipLoss would
  hold this rank's (N/W) x N logits several times over; that figure is printed too.
- Reserve: 1 GiB for the CUDA context, cuBLAS workspaces and the data pipeline, and 10% of the GPU
  memory left free against allocator fragmentation.
- Step time: model FLOPs per sample counted on the same meta trace (torch's FlopCounterMode), backward
  = 2 x forward (attention's FLOPs, which the stand-in does not compute, are counted from its q and k,
  halved when causal); gradient caching adds one forward (the no-graph feature pass) and checkpointing
  one more. Throughput = peak dense FLOP/s of the GPU x an achievable fraction: `--mfu`, else the
  model-FLOPs utilisation measured on that GPU family in the pytest-benchmark JSON named by
  `--results FILE_OR_FOLDER` (benchmarks/bench_train_step.py writes it), else the assumed fraction of
  GPU_SPECS; the output says which. Nothing is read unless named: the installed package never looks
  for a repository's benchmarks/results/. Communication is ring collectives over the slowest link
  (NVLink inside a node of 8, the per-GPU network link across nodes), not overlapped with compute:
  the printed step time is an upper bound, max(compute, communication) the lower one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

import torch

from ..model.config import get_preset
from .config import DeepSpeedSection
from .gpus import GPU_SPECS, GPUSpec, spec_for_device  # noqa: F401 (spec_for_device: the benchmarks' import)


GiB = 1024**3
RESERVE_BYTES = 1 * GiB
FRAGMENTATION_HEADROOM = 0.10
# the trainer's DeepSpeed defaults
REDUCE_BUCKET = DeepSpeedSection.reduce_bucket_size
PREFETCH_BUCKET = DeepSpeedSection.stage3_prefetch_bucket_size


GPUS_PER_NODE = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlanError(ValueError):
    """An impossible planning request (unknown GPU, precision the GPU lacks, indivisible batch)."""


# ------------------------------------------------------------------------------------ meta trace
def _attention_flops(q, k, causal) -> int:
    # q k^T and p v: 2 x (2 B H S_q S_k d) forward, halved for causal (FlashAttention's convention)
    b, h, sq, d = q.shape
    flops = 4 * b * h * sq * k.shape[2] * d
    return flops // 2 if causal else flops


def _graph_attention_flops(outputs) -> int:
    """Attention FLOPs of a traced forward: the meta-device attention nodes in the autograd graph behind
    `outputs` keep q, k and the causal flag (call it on a trace without checkpointing: a checkpointed
    block's saved tensors would be recomputed when read)."""
    from .. import ops

    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen, total = set(), 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if getattr(node, "_forward_cls", None) is ops._MetaAttention:
            q, k = node.saved_tensors[:2]
            total += _attention_flops(q, k, node.causal)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return total


@dataclass
class TraceResult:
    act_per_sample: float  # saved-tensor bytes per sample, no checkpointing
    act_fixed: float  # batch-independent part (e.g. the positional embedding cast)
    ckpt_per_sample: float  # stored bytes per sample with checkpointing (block inputs and the rest)
    ckpt_fixed: float
    block_per_sample: float  # the largest checkpointed block's saved bytes per sample (recomputed in bwd)
    flops_per_sample: float  # forward FLOPs per (image, caption) pair
    params: int


def _trace_once(name: str, dtype: torch.dtype, batch: int, ckpt: bool, overrides: dict):
    """(saved bytes, largest block bytes, forward FLOPs, parameter count) of one meta forward; the FLOPs
    are None with checkpointing (they are counted on the traces without)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model.clip import create_model

    with torch.device("meta"):
        model = create_model(name, **overrides, grad_checkpointing=ckpt)
    model = model.to(dtype).train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    blocks: dict[int, dict[int, int]] = {}
    current = []

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params:
            saved[key] = storage.nbytes()
            if current:
                blocks.setdefault(current[-1], {})[key] = storage.nbytes()
        return t

    # the units activation checkpointing wraps: transformer blocks, ResNet stages
    units = []
    for tower in (model.transformer, getattr(model.visual, "transformer", None)):
        if tower is not None:
            units += list(tower.resblocks)
    if not hasattr(model.visual, "transformer"):
        units += [model.visual.layer1, model.visual.layer2, model.visual.layer3, model.visual.layer4]
    def enter(i):
        return lambda module, args: current.append(i) and None

    def leave(module, args, output):
        current.pop()  # returns None: the output is left as it is

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(enter(i)))
        handles.append(unit.register_forward_hook(leave))

    r = model.image_size
    images = torch.empty(batch, 3, r, r, device="meta", dtype=dtype)
    tokens = torch.zeros(batch, model.context_length, dtype=torch.long, device="meta")
    # meta tensors: ops.attention takes the fused kernels' stand-in (saved tensors, no FLOPs of its own)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = model(images, tokens)
    for h in handles:
        h.remove()
    block_max = max((sum(b.values()) for b in blocks.values()), default=0)
    flops = None if ckpt else counter.get_total_flops() + _graph_attention_flops(outputs)
    return sum(saved.values()), block_max, flops, sum(p.numel() for p in model.parameters())


def trace_model(name: str, precision: str = "fp32", overrides: dict | None = None) -> TraceResult:
    """Saved-tensor bytes and FLOPs of `name`'s forward, as per-sample slopes and fixed parts."""
    dtype = DTYPES[precision]
    overrides = overrides or {}
    a2, b2, f2, params = _trace_once(name, dtype, 2, False, overrides)
    a4, b4, f4, _ = _trace_once(name, dtype, 4, False, overrides)
    c2, _, _, _ = _trace_once(name, dtype, 2, True, overrides)
    c4, _, _, _ = _trace_once(name, dtype, 4, True, overrides)
    act = (a4 - a2) / 2
    ck = (c4 - c2) / 2
    return TraceResult(
        act_per_sample=act, act_fixed=a2 - 2 * act, ckpt_per_sample=ck, ckpt_fixed=c2 - 2 * ck,
        block_per_sample=(b4 - b2) / 2, flops_per_sample=(f4 - f2) / 2, params=params,
    )


# ---------------------------------------------------------------------------------- the estimate
@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float
    buckets: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buckets + self.activations + self.loss


def state_bytes(params: int, precision: str, zero: int, world: int,
                trainable: int | None = None) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer states, DeepSpeed buckets) in bytes per GPU; gradients, optimizer
    states and the reduce bucket count the `trainable` parameters only (default: all; LiT locks the rest)."""
    w = 4 if precision == "fp32" else 2
    k = 8 if precision == "fp32" else 12
    t = params if trainable is None else trainable
    p_b, g_b, o_b = w * params, w * t, k * t
    if zero >= 1:
        o_b /= world
    if zero >= 2:
        g_b /= world
    if zero >= 3:
        p_b /= world
    if world == 1 or zero == 0:
        buckets = 0.0
    elif zero in (1, 2):
        buckets = w * min(REDUCE_BUCKET, t)
    else:
        buckets = w * min(PREFETCH_BUCKET, params)
    return p_b, g_b, o_b, buckets


def activation_bytes(trace: TraceResult, micro: int, ckpt: bool) -> float:
    if ckpt:
        return trace.ckpt_fixed + micro * (trace.ckpt_per_sample + trace.block_per_sample)
    return trace.act_fixed + micro * trace.act_per_sample


def loss_bytes(local: int, global_batch: int, embed: int) -> float:
    # fp32 features and their gradients for this rank (2 towers), gathered text features and gradient
    return 4 * (2 * 2 * local * embed + 2 * global_batch * embed + 2 * global_batch)


def clip_loss_bytes(local: int, global_batch: int) -> float:
    # OpenCLIP's ClipLoss: logits_per_image and logits_per_text (local x N each, fp32), and in backward
    # the softmax of each cross-entropy and its gradient: ~4 live local x N buffers
    return 4 * 4 * local * global_batch


def comm_bytes(params: int, precision: str, zero: int, world: int, steps: int, global_batch: int,
               embed: int, caching: bool, trainable: int | None = None) -> float:
    """Bytes each GPU sends (= receives) per optimizer step with ring collectives; gradients and updated
    weights move for the `trainable` parameters only (default: all), ZeRO 3's weight gathers for all."""
    if world == 1:
        return 0.0
    w = 4 if precision == "fp32" else 2
    f = (world - 1) / world
    t = params if trainable is None else trainable
    if zero in (0, 1):
        model = 2 * f * w * t  # one gradient all-reduce (ZeRO 1: reduce-scatter + all-gather) per step
    elif zero == 2:
        model = steps * f * w * t + f * w * t  # reduce-scatter every micro-step, then all-gather
    else:
        forwards = 2 if caching else 1  # the cached feature pass gathers the weights too
        # all-gather per forward and in backward (every weight), reduce-scatter (the trainable gradients)
        model = steps * ((forwards + 1) * params + t) * f * w
    loss = 2 * f * 4 * global_batch * embed + 2 * 2 * 4 * global_batch  # gather text, scatter its grad, stats
    return model + loss


def link_gbs(spec: GPUSpec, world: int) -> float:
    return spec.nvlink_gbs if world <= GPUS_PER_NODE else spec.network_gbs


def measured_mfu(gpu: str, results: str | None, model: str | None = None) -> tuple[float, str] | None:
    """Model-FLOPs utilisation measured by benchmarks/bench_train_step.py on this GPU family, if any, in
    `results`: a pytest-benchmark JSON file, or a folder of them (its *.json; unreadable ones skipped).
    The highest of `model`'s measurements, else the highest of any model's. Nothing is read when
    `results` is None; a path that does not exist, or a named file that is not JSON, is a PlanError."""
    if not results:
        return None
    if os.path.isdir(results):
        paths, named = sorted(glob.glob(os.path.join(results, "*.json"))), False
    elif os.path.isfile(results):
        paths, named = [results], True
    else:
        raise PlanError(f"--results {results}: no such file or folder")
    family = gpu.split("-")[0]
    found = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            if named:
                raise PlanError(f"--results {results}: not a readable pytest-benchmark JSON file ({exc})") from exc
            continue
        if not isinstance(data, dict):
            continue
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("provider") == "clipforge" and info.get("mfu") and family in str(info.get("device", "")):
                found.append((info.get("preset") == model, float(info["mfu"]),
                              f"{os.path.basename(path)}: {bench.get('name')}"))
    if not found:
        return None
    _, mfu, source = max(found)
    return mfu, source


@dataclass
class Option:
    zero: int
    ckpt: bool
    micro: int
    steps: int
    memory: Memory
    compute_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass
class Plan:
    model: str
    gpu: str
    gpus: int
    batch: int
    precision: str
    trace: TraceResult
    embed: int
    capacity: float
    mfu: float
    mfu_source: str
    options: list[Option]
    max_micro: dict  # (zero, ckpt) -> the largest micro-batch that fits (0: none)
    best: Option | None
    trainable: int  # parameters that get gradients and optimizer states (all but LiT's locked ones)
    locks: dict  # the model.lock_* keys planned for

    @property
    def local(self) -> int:
        return self.batch // self.gpus


def trainable_params(model: str, locks: dict) -> int:
    """Parameters left trainable by the run config's model.lock_* keys `locks`, counted on the meta device."""
    from ..model.clip import create_model
    from .config import TrainConfig
    from .finetune import lock_towers

    with torch.device("meta"):
        m = create_model(model)
    lock_towers(m, TrainConfig.from_dict({"model": {"name": model, **locks}}))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def make_plan(model: str, gpu: str, gpus: int, batch: int, precision: str | None = None,
              zero: int | None = None, mfu: float | None = None, results_dir: str | None = None,
              trace: TraceResult | None = None, locks: dict | None = None) -> Plan:
    """The options and the recommendation. The achievable fraction of peak is `mfu`, else the one
    measured in `results_dir` (a benchmark JSON file or folder, read only when given), else GPU_SPECS'.
    `locks`: model.lock_* keys (LiT): locked parameters need no gradient, optimizer state or reduction."""
    if gpu not in GPU_SPECS:
        raise PlanError(f"unknown GPU type {gpu!r}; choose one of {', '.join(GPU_SPECS)}")
    spec = GPU_SPECS[gpu]
    precision = precision or ("fp16" if gpu.startswith("V100") else "bf16")
    if precision not in DTYPES:
        raise PlanError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    if precision not in spec.peak_tflops:
        raise PlanError(f"{gpu} has no {precision} support; use fp16 (or fp32) on V100")
    if gpus < 1 or batch < 1:
        raise PlanError("--gpus and --batch must be positive")
    if batch % gpus:
        raise PlanError(f"the global batch {batch} must be divisible by the number of GPUs {gpus}")
    if zero is not None and zero not in (0, 1, 2, 3):
        raise PlanError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError(f"--mfu is a fraction of peak FLOP/s in (0, 1], got {mfu:g}")
    cfg = get_preset(model)  # refuses unknown names with the list of presets
    trace = trace or trace_model(model, precision)
    trainable = trainable_params(model, locks) if locks else trace.params
    local = batch // gpus
    capacity = spec.memory_gib * GiB * (1 - FRAGMENTATION_HEADROOM) - RESERVE_BYTES
    measured = measured_mfu(gpu, results_dir, model) if mfu is None else None
    if mfu is not None:
        source = "given with --mfu"
    elif measured:
        mfu, source = measured[0], f"measured ({measured[1]})"
    elif results_dir:
        mfu, source = spec.mfu, f"assumed: no train-step measurement on {gpu.split('-')[0]} in {results_dir}"
    else:
        mfu, source = spec.mfu, "assumed: no --mfu or --results given"
    throughput = spec.peak_tflops[precision] * 1e12 * mfu
    divisors = [m for m in range(1, local + 1) if local % m == 0]
    options, max_micro = [], {}
    for z in ([zero] if zero is not None else [0, 1, 2, 3]):
        for ckpt in (False, True):
            p_b, g_b, o_b, buckets = state_bytes(trace.params, precision, z, gpus, trainable)
            max_micro[(z, ckpt)] = 0
            for m in divisors:
                steps = local // m
                mem = Memory(p_b, g_b, o_b, buckets, activation_bytes(trace, m, ckpt),
                             loss_bytes(local, batch, cfg.embed_dim) if steps > 1 or gpus > 1 else 0.0)
                if mem.total > capacity:
                    continue
                max_micro[(z, ckpt)] = m
                passes = 3 + (1 if steps > 1 else 0) + (1 if ckpt else 0)
                compute = trace.flops_per_sample * local * passes / throughput
                comm = comm_bytes(trace.params, precision, z, gpus, steps, batch, cfg.embed_dim, steps > 1, trainable)
                options.append(Option(z, ckpt, m, steps, mem, compute, comm / (link_gbs(spec, gpus) * 1e9)))
    # fastest; ties go to the larger micro-batch (better GEMM efficiency), then the smaller memory (so
    # ZeRO 1/2 beat ZeRO 0 where they move the same bytes), then the lower stage
    best = min(options, key=lambda o: (float(f"{o.step_s:.6g}"), -o.micro, round(o.memory.total / GiB, 2), o.zero),
               default=None)
    return Plan(model, gpu, gpus, batch, precision, trace, cfg.embed_dim, capacity, mfu, source, options,
                max_micro, best, trainable, dict(locks or {}))


# --------------------------------------------------------------------------------------- output
def _gb(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def format_plan(plan: Plan) -> str:
    t, spec = plan.trace, GPU_SPECS[plan.gpu]
    lines = [
        f"clipforge plan: {plan.model} on {plan.gpus} x {plan.gpu}, contrastive batch {plan.batch:,} "
        f"({plan.local:,} per GPU), {plan.precision}",
        f"  parameters {t.params / 1e6:.1f} M"
        + (f" ({plan.trainable / 1e6:.1f} M trainable, the rest locked)" if plan.trainable != t.params else "")
        + f"; forward {t.flops_per_sample / 1e9:.2f} GFLOP per pair; "
        f"usable memory {plan.capacity / GiB:.1f} GiB of {spec.memory_gib:g} "
        f"(1 GiB reserve, {FRAGMENTATION_HEADROOM:.0%} headroom)",
        f"  activations per sample: {t.act_per_sample / 2**20:.2f} MiB, with checkpointing "
        f"{(t.ckpt_per_sample + t.block_per_sample) / 2**20:.2f} MiB "
        f"(stored {t.ckpt_per_sample / 2**20:.2f} + one block recomputed {t.block_per_sample / 2**20:.2f})",
        f"  loss buffers (clipforge, tiled): {loss_bytes(plan.local, plan.batch, plan.embed) / 2**20:.1f} MiB; "
        f"an N x N ClipLoss would hold {clip_loss_bytes(plan.local, plan.batch) / GiB:.2f} GiB",
        "",
        "  ZeRO  ckpt   weights     grads   optimizer   buckets | largest micro-batch",
    ]
    stages = sorted({z for z, _ in plan.max_micro})
    for z in stages:
        for ckpt in (False, True):
            p_b, g_b, o_b, bk = state_bytes(t.params, plan.precision, z, plan.gpus, plan.trainable)
            m = plan.max_micro[(z, ckpt)]
            lines.append(f"  {z:4d}  {'yes' if ckpt else 'no ':4s} {_gb(p_b)} {_gb(g_b)} {_gb(o_b)} {_gb(bk)} | "
                         f"{m if m else 'does not fit'}")
    lines.append("")
    lines.append(f"  step time from {spec.peak_tflops[plan.precision]:g} TFLOP/s peak x {plan.mfu:.0%} "
                 f"achievable ({plan.mfu_source}); links: {link_gbs(spec, plan.gpus):g} GB/s per GPU "
                 f"({'NVLink' if plan.gpus <= GPUS_PER_NODE else 'network, nodes of 8'})")
    b = plan.best
    if b is None:
        lines.append("  no configuration fits: use more GPUs, a higher ZeRO stage or a smaller model")
        return "\n".join(lines)
    comm = comm_bytes(t.params, plan.precision, b.zero, plan.gpus, b.steps, plan.batch, plan.embed, b.steps > 1,
                      plan.trainable)
    m = b.memory
    lines += [
        f"  recommended: ZeRO {b.zero}, activation checkpointing {'on' if b.ckpt else 'off'}, micro-batch "
        + (f"{b.micro} x {b.steps} gradient-caching steps" if b.steps > 1 else f"{b.micro} (no gradient caching)"),
        f"    memory per GPU {m.total / GiB:.2f} GiB = weights {m.params / GiB:.2f} + grads {m.grads / GiB:.2f} "
        f"+ optimizer {m.optimizer / GiB:.2f} + buckets {m.buckets / GiB:.2f} + activations "
        f"{m.activations / GiB:.2f} + loss {m.loss / GiB:.2f}",
        f"    communication {comm / 1e9:.2f} GB per GPU per step",
        f"    step time ~{b.step_s:.2f} s (compute {b.compute_s:.2f} s + communication {b.comm_s * 1e3:.0f} ms; "
        f">= {max(b.compute_s, b.comm_s):.2f} s with full overlap) -> "
        f"{plan.batch / b.step_s:,.0f} pairs/s",
    ]
    return "\n".join(lines)


def run_config(plan: Plan, data_path: str, output_dir: str | None = None) -> dict:
    """The recommended configuration as a run config of engine/train_config.py (validated)."""
    from .config import TrainConfig

    b = plan.best
    if b is None:
        raise PlanError("no configuration fits, so there is no run config to write")
    is_l = plan.model.startswith("ViT-L")
    data = {
        "model": {"name": plan.model, "grad_checkpointing": b.ckpt, **plan.locks},
        "data": {"kind": "webdataset", "path": data_path, "loader": "dali", "num_workers": 8},
        "batch": {"global_size": plan.batch, "micro_size": b.micro},
        "optimizer": {"lr": 4.0e-4 if is_l else 5.0e-4, "weight_decay": 0.2, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 2000},  # total_steps: max_steps
        "precision": {"dtype": plan.precision},
        "deepspeed": {"zero_stage": b.zero, "overlap_comm": plan.gpus > 1 and b.zero > 0},
        "max_steps": max(2000, 400_000_000 * 32 // plan.batch),
        "output_dir": output_dir or f"runs/{plan.model.lower()}-{plan.batch}-{plan.gpus}x{plan.gpu.lower()}",
    }
    TrainConfig.from_dict(data).validate(plan.gpus)
    return data


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model preset, e.g. ViT-B-32")
    parser.add_argument("--gpu", required=True, choices=list(GPU_SPECS), help="GPU type")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--batch", type=int, required=True, help="global contrastive batch")
    parser.add_argument("--precision", choices=list(DTYPES), default=None,
                        help="default: bf16 (A100/H100), fp16 (V100)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                        help="ZeRO stage (default: the planner picks)")
    parser.add_argument("--mfu", type=float, default=None,
                        help="achievable fraction of peak FLOP/s, e.g. 0.38 (default: --results, else the "
                             "assumption for the GPU, which the output states)")
    parser.add_argument("--results", metavar="PATH", default=None,
                        help="pytest-benchmark JSON file, or folder of them, with measured train-step MFU "
                             "(benchmarks/bench_train_step.py); default: none, nothing is read")
    for tower in ("image", "text"):
        parser.add_argument(f"--lock-{tower}", type=int, default=None, metavar="K",
                            help=f"LiT: plan with the {tower} tower locked but for its last K groups "
                                 f"(model.lock_{tower}, model.lock_{tower}_unlocked_groups)")
    parser.add_argument("--write-config", metavar="PATH", default=None,
                        help="write the recommended configuration as a run config (YAML)")
    parser.add_argument("--data", default="/data/shards/{00000..41407}.tar",
                        help="webdataset shards for the written run config")


def run(args) -> int:
    try:
        locks = {}
        for tower in ("image", "text"):
            if getattr(args, f"lock_{tower}") is not None:
                locks.update({f"lock_{tower}": True, f"lock_{tower}_unlocked_groups": getattr(args, f"lock_{tower}")})
        plan = make_plan(args.model, args.gpu, args.gpus, args.batch, args.precision, args.zero, args.mfu,
                         args.results, locks=locks)
        print(format_plan(plan))
        if args.write_config:
            import yaml
            data = run_config(plan, args.data)
            with open(args.write_config, "w") as f:
                f.write(f"# written by: clipforge plan --model {args.model} --gpu {args.gpu} --gpus {args.gpus} "
                        f"--batch {args.batch} --precision {plan.precision}"
                        f"{'' if args.zero is None else f' --zero {args.zero}'}"
                        + "".join(f" --lock-{t} {getattr(args, f'lock_{t}')}" for t in ("image", "text")
                                  if getattr(args, f"lock_{t}") is not None) + f" --data '{args.data}'\n"
                        f"# set data.path to your shards; launch with deepspeed (see README)\n")
                yaml.safe_dump(data, f, sort_keys=False)
            print(f"  run config written to {args.write_config}")
    except (PlanError, ValueError) as exc:
        print(f"clipforge plan: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from ..cli import run_command

    return run_command("plan", argv)


if __name__ == "__main__":
    sys.exit(main())

"""The compile gate: every Triton kernel of clipforge.kernels compiled for NVIDIA GPUs, on a machine without one.

    python benchmarks/compile_gate.py                  # every case, sm80 + sm90
    python benchmarks/compile_gate.py --quick          # the CI subset (tests/test_compile_gate.py), < 1 min cold
    python benchmarks/compile_gate.py --json rows.json # also write one JSON row per compiled kernel

Why: the Triton interpreter (TRITON_INTERPRET=1, how CI tests the kernels' numerics) accepts code that the
GPU compiler refuses (a plain module-level global, for one), and it knows nothing of registers or shared
memory. Triton compiles to PTX and cubin without a GPU (its bundled ptxas); only launching needs one.

How: the real host launchers run on `meta` tensors (shapes and strides, no data, no arithmetic) with
each `@triton.jit` kernel of the op module replaced by a recorder, and the module's device queries
(capability, SM count, device check) answering for the target architecture. Every recorded launch is
then bound and specialised by Triton's own binder for that target (the runtime's signature, constexprs,
divisibility attributes and options; meta tensors report their offsets as addresses, so a view's
alignment is what it would be on the GPU), compiled with `triton.compile`, and `ptxas -v` gives its
registers and spills. The loss cases drive `clipforge.loss`'s own Triton path (forward statistics and
the row-chunked backward), and the siglip cases `clipforge.siglip_loss`'s (the value-only kernel, and the
gradient tiles of its row-chunked loss-and-gradients pass), so the kernels are compiled at the chunk shapes training launches.

It fails (exit 1; `--report-only` just prints) on:
- a compile error;
- any register spill (SPILL_LIMIT = 0 bytes), in every dtype: bf16 / fp16 (what `ops` routes to
  Triton) and fp32 (Triton only when forced);
- shared memory per program above the architecture's opt-in limit (SHARED_LIMIT: 163 KiB on sm80,
  227 KiB on sm90).
sm70 (V100) is not a target: `clipforge.ops` routes nothing to Triton there (see its table), and refuses
a forced Triton backend on it.

It must run without TRITON_INTERPRET=1 (under the interpreter there is nothing to compile).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SPILL_LIMIT = 0  # bytes of spilled registers (stores + loads) allowed per kernel
SM_COUNT = {80: 108, 90: 132}  # A100, H100 / H200: what the launchers' grid heuristics see

# attention: (name, batch, heads, seq, head_dim, causal); batch x heads only shape the grid
ATTENTION_SHAPES = [
    ("vit-b32-s50", 2, 12, 50, 64, False),
    ("text-s77-causal", 2, 8, 77, 64, True),
    ("vit-b16-s197", 2, 12, 197, 64, False),
    ("vit-l14-s257", 2, 16, 257, 64, False),
    ("vit-l14-336-s577", 2, 16, 577, 64, False),
    ("hd128-s50", 2, 8, 50, 128, False),
    ("hd128-s77-causal", 2, 8, 77, 128, True),
    ("hd128-s197", 2, 8, 197, 128, False),
    ("hd128-s577", 2, 8, 577, 128, False),
]
# loss, siglip: (local image rows, gathered text columns, d); 256 / 4096 local rows of a 32k global batch
LOSS_SHAPES = [(rows, 32768, d) for rows in (256, 4096) for d in (512, 768, 1024)]
OPS = ("attention", "loss", "siglip")
DTYPES = ("bfloat16", "float16", "float32")
# the CI subset: the text tower's causal shape (fused backward on sm90, split on sm80), an image tower's
# pipelined key loop in bf16 and in fp32 (where 224 KiB of shared memory once overflowed sm80), the loss
QUICK = {("attention", "text-s77-causal", "bfloat16"), ("attention", "vit-b16-s197", "bfloat16"),
         ("attention", "vit-b16-s197", "float32"), ("loss", "n256-m32768-d768", "bfloat16"),
         ("siglip", "n256-m32768-d768", "bfloat16"), ("siglip", "n256-m32768-d768", "float16")}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


@contextlib.contextmanager
def recording(module, arch: int, log: list):
    """Replace every @triton.jit kernel of `module` by a recorder and make its device queries answer for
    `arch`; the launchers then run on meta tensors exactly as they would on that GPU."""
    from triton.runtime.jit import JITFunction

    saved = {}
    for name, value in vars(module).items():
        if isinstance(value, JITFunction) and name.endswith("_kernel"):
            saved[name] = value
    patches = {name: _Recorder(fn, log) for name, fn in saved.items()}
    patches["cuda_capability"] = lambda device: (arch // 10, arch % 10)
    patches["multiprocessor_count"] = lambda device: SM_COUNT[arch]
    patches["check_kernel_device"] = lambda kernel, tensor, op, *other: None
    originals = {name: getattr(module, name) for name in patches if hasattr(module, name)}
    try:
        for name, value in patches.items():
            if name in originals:
                setattr(module, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def compile_launch(fn, args, kwargs, arch: int):
    """Bind and specialise one launch with Triton's own binder for `arch`, compile it. Returns the
    compiled kernel (raises what the compiler raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes stored + loaded) from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if _takes_arch(get_ptxas) else get_ptxas().path
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def _takes_arch(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) > 0


# ------------------------------------------------------------------------------------------- cases
def _attention_launches(shape, dtype_name, arch, log):
    import torch

    attn = importlib.import_module("clipforge.kernels.attention")
    _, batch, heads, seq, head_dim, causal = shape
    dtype = getattr(torch, dtype_name)
    with recording(attn, arch, log):
        qkv = torch.empty(batch, seq, 3, heads, head_dim, dtype=dtype, device="meta")
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # the model's packed layout
        scale = head_dim ** -0.5
        o, lse = attn._attention_forward(q, k, v, causal, scale)
        attn._attention_backward(torch.empty_like(o), q, k, v, o, lse, causal, scale)


def _feature_launches(module: str, shape, dtype_name, arch, log, drive):
    """Both losses' cases: `drive(image, text)` runs the loss's own Triton path on (rows, d) image and
    (cols, d) text features on `meta`, with the kernels of clipforge.kernels.<module> recorded."""
    import torch

    kernel = importlib.import_module(f"clipforge.kernels.{module}")
    rows, cols, dim = shape
    dtype = getattr(torch, dtype_name)
    with recording(kernel, arch, log):
        drive(torch.empty(rows, dim, dtype=dtype, device="meta"), torch.empty(cols, dim, dtype=dtype, device="meta"))


def _loss_launches(shape, dtype_name, arch, log):
    import torch

    from clipforge.loss import _Impl

    def drive(image, text):
        impl = _Impl("triton", None)
        row_lse, col_max, col_sum = impl.forward(image, text, 14.3)
        col_lse = col_max + torch.log(col_sum)
        impl.backward(image, text, 14.3, row_lse, col_lse, 0, 1.0 / (2 * text.shape[0]))

    _feature_launches("contrastive", shape, dtype_name, arch, log, drive)


def _siglip_launches(shape, dtype_name, arch, log):
    from clipforge.siglip_loss import _SigLipImpl

    def drive(image, text):
        impl = _SigLipImpl("triton", None)
        impl.forward(image, text, 10.0, -10.0, 0)  # the value alone (no gradient wanted)
        impl.forward_backward(image, text, 10.0, -10.0, 0, 1.0 / text.shape[0])  # value and gradients: training

    _feature_launches("siglip", shape, dtype_name, arch, log, drive)


def cases(quick: bool, ops=OPS, dtypes=DTYPES):
    """(op, shape name, dtype, launch function of (arch, log)) for every case of the gate."""
    out = []
    for shape in ATTENTION_SHAPES if "attention" in ops else []:
        for dtype in DTYPES:
            out.append(("attention", shape[0], dtype, lambda arch, log, s=shape, d=dtype: _attention_launches(s, d, arch, log)))
    for op, launch in (("loss", _loss_launches), ("siglip", _siglip_launches)):
        for shape in LOSS_SHAPES if op in ops else []:
            for dtype in DTYPES:
                name = f"n{shape[0]}-m{shape[1]}-d{shape[2]}"
                out.append((op, name, dtype, lambda arch, log, s=shape, d=dtype, f=launch: f(s, d, arch, log)))
    return [c for c in out if (not quick or c[:3] in QUICK) and c[2] in dtypes]


def run(quick: bool, archs, ops=OPS, dtypes=DTYPES, stream=sys.stdout):
    """Compile every case for every arch. Returns one row (dict) per recorded launch."""
    from clipforge.kernels.utils import is_interpreted

    attention = importlib.import_module("clipforge.kernels.attention")  # the package exports a function of that name
    if is_interpreted(attention._attention_fwd_kernel):
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to compile the kernels for a GPU")
    rows, compiled = [], {}
    for op, shape, dtype, launches in cases(quick, ops, dtypes):
        for arch in archs:
            log = []
            launches(arch, log)
            for fn, grid, args, kwargs in log:
                row = {"op": op, "shape": shape, "dtype": dtype, "arch": arch,
                       "kernel": fn.__name__.strip("_").removesuffix("_kernel"), "grid": list(grid),
                       **{k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool))},
                       "warps": kwargs.get("num_warps", 4), "stages": kwargs.get("num_stages", 3)}
                t0 = time.perf_counter()
                try:
                    kernel = compile_launch(fn, args, kwargs, arch)
                except Exception as exc:  # the compiler's own message is the report
                    row.update(error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
                else:
                    key = kernel.hash
                    if key not in compiled:
                        compiled[key] = ptxas_usage(kernel.asm["ptx"], arch)
                    row["regs"], row["spill_bytes"] = compiled[key]
                    row["shared"] = kernel.metadata.shared
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                row["problems"] = problems(row)
                rows.append(row)
                _print_row(row, stream)
    return rows


def problems(row) -> list[str]:
    """What is wrong with one compiled launch (empty when it passes the gate)."""
    if "error" in row:
        return ["does not compile"]
    out = []
    if row["spill_bytes"] > SPILL_LIMIT:
        out.append(f"spills {row['spill_bytes']} B (limit {SPILL_LIMIT} B)")
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"needs {row['shared'] / 1024:.1f} KiB of shared memory (sm{row['arch']} has "
                   f"{SHARED_LIMIT[row['arch']] // 1024} KiB)")
    return out


_HEADER = (f"{'op':<9} {'shape':<18} {'dtype':<8} {'kernel':<26} {'sm':>3} {'M':>4} {'N':>4} {'K':>4} "
           f"{'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem KiB':>8}  verdict")


def _print_row(r, stream):
    if "error" in r:
        print(f"{r['op']:<9} {r['shape']:<18} {r['dtype']:<8} {r['kernel']:<26} {r['arch']:>3}  COMPILE ERROR: "
              f"{r['error'].splitlines()[0][:300]}", file=stream, flush=True)
        return
    print(f"{r['op']:<9} {r['shape']:<18} {r['dtype']:<8} {r['kernel']:<26} {r['arch']:>3} "
          f"{r.get('BLOCK_M', '-'):>4} {r.get('BLOCK_N', '-'):>4} {r.get('BLOCK_K', '-'):>4} {r['warps']:>5} "
          f"{r['stages']:>6} {r['regs']:>5} {r['spill_bytes']:>7} {r['shared'] / 1024:>8.1f}  "
          f"{'; '.join(r['problems']) or 'ok'}", file=stream, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a kernel fails the gate")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}; limits: spills {SPILL_LIMIT} B, "
          f"shared {({k: v // 1024 for k, v in SHARED_LIMIT.items()})} KiB", flush=True)
    print(_HEADER, flush=True)
    t0 = time.perf_counter()
    rows = run(args.quick, args.arch, args.op, args.dtype)
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} launches compiled in {time.perf_counter() - t0:.0f} s; {len(bad)} fail the gate", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    for r in bad:
        print(f"FAIL {r['op']} {r['shape']} {r['dtype']} {r['kernel']} sm{r['arch']}: {'; '.join(r['problems'])}"
              + (f"\n  {r['error'][:1500]}" if "error" in r else ""), file=sys.stderr)
    return 1 if bad and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())

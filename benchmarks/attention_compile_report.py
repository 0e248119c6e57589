"""Compile the attention kernels for NVIDIA GPUs on a machine without one, and report their resources.

    python benchmarks/attention_compile_report.py                 # every CLIP shape, bf16, sm80 + sm90
    python benchmarks/attention_compile_report.py --quick --check # one shape, fails on spills / shared memory

Triton compiles to PTX and cubin without a GPU (its bundled ptxas); only launching needs one. This
runs the real launchers of `clipforge.kernels.attention` on CPU tensors with the kernels replaced by
recorders, so each launch is compiled with exactly the arguments, tile sizes, warps and stages the
heuristic picks, specialised the way the Triton runtime does (integers equal to 1 become constants;
pointers and integers divisible by 16 get the divisibility hint). For each kernel it prints registers
per thread, spilled bytes (from `ptxas -v`) and shared memory per program. It catches what the
interpreter cannot: code that does not compile for the GPU, register spills, and tiles that overflow
shared memory (limits: 163 KiB on sm80, 227 KiB on sm90).

It must run without TRITON_INTERPRET=1 (under the interpreter there is nothing to compile).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (name, batch, heads, seq, head_dim, causal); batch x heads only shape the grid, keep them small
SHAPES = [
    ("vit-b32-s50", 2, 12, 50, 64, False),
    ("text-s77-causal", 2, 8, 77, 64, True),
    ("vit-b16-s197", 2, 12, 197, 64, False),
    ("vit-l14-s257", 2, 16, 257, 64, False),
    ("vit-l14-336-s577", 2, 16, 577, 64, False),
    ("hd128-s197", 2, 8, 197, 128, False),
    ("hd128-s77-causal", 2, 8, 77, 128, True),
    ("hd128-s50", 2, 8, 50, 128, False),
]


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _specialise(fn, args, kwargs):
    """signature, constexprs, attrs and options, as the Triton runtime would build them for these args."""
    import torch

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in kwargs and name.isupper():
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPE_NAMES[str(value.dtype)]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"unexpected argument {name}={value!r}")
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return signature, constexprs, attrs, options


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes stored + loaded) from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
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


def report(shapes, archs, dtype_name="bfloat16"):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attn = importlib.import_module("clipforge.kernels.attention")
    from clipforge.kernels.utils import is_interpreted

    if is_interpreted(attn._attention_fwd_kernel):
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to compile the kernels for a GPU")
    dtype = getattr(torch, dtype_name)
    rows = []
    kernels = ["_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
               "_attention_bwd_dq_kernel", "_attention_bwd_fused_kernel"]
    for name, batch, heads, seq, head_dim, causal in shapes:
        for arch in archs:
            # record the launches as the launchers make them on a device of this architecture
            log = []
            saved = {k: getattr(attn, k) for k in kernels + ["cuda_capability"]}
            try:
                for k in kernels:
                    setattr(attn, k, _Recorder(saved[k], log))
                attn.cuda_capability = lambda device, arch=arch: (arch // 10, arch % 10)
                qkv = torch.randn(batch, seq, 3, heads, head_dim, dtype=dtype)
                q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # the model's packed layout
                scale = head_dim ** -0.5
                o, lse = attn._attention_forward(q, k, v, causal, scale)
                attn._attention_backward(torch.randn_like(o), q, k, v, o, lse, causal, scale)
            finally:
                for k, fn in saved.items():
                    setattr(attn, k, fn)
            for fn, grid, args, kwargs in log:
                signature, constexprs, attrs, options = _specialise(fn, args, dict(kwargs))
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
                rows.append({
                    "shape": name, "kernel": fn.__name__.removeprefix("_attention_").removesuffix("_kernel"),
                    "arch": arch, "block_m": constexprs.get("BLOCK_M"), "block_n": constexprs.get("BLOCK_N", "-"),
                    "warps": options.get("num_warps", 4), "stages": options.get("num_stages", 3),
                    "regs": regs, "spill_bytes": spills, "shared": compiled.metadata.shared, "grid": grid,
                })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape (77 tokens, causal)")
    parser.add_argument("--check", action="store_true", help="exit 1 on register spills or shared memory over the limit")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if s[0] == "text-s77-causal"] if args.quick else SHAPES
    archs = [80, 90]
    rows = report(shapes, archs, args.dtype)
    print(f"{'shape':<18} {'kernel':<15} {'sm':>3} {'M':>4} {'N':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill B':>7} {'shared KiB':>10}")
    bad = []
    for r in rows:
        print(f"{r['shape']:<18} {r['kernel']:<15} {r['arch']:>3} {r['block_m']:>4} {r['block_n']:>4} {r['warps']:>5} "
              f"{r['stages']:>6} {r['regs']:>5} {r['spill_bytes']:>7} {r['shared'] / 1024:>10.1f}")
        if r["spill_bytes"] or r["shared"] > SHARED_LIMIT[r["arch"]]:
            bad.append(r)
    if bad:
        print(f"{len(bad)} kernel(s) spill registers or exceed shared memory", file=sys.stderr)
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

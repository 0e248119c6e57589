"""The compile gate (benchmarks/compile_gate.py): every Triton kernel compiles for sm80 and sm90.

The interpreter that runs the kernels' numerics in CI accepts code the GPU compiler refuses and knows
nothing of registers or shared memory, so each kernel is also compiled for the GPU targets here (Triton's
bundled ptxas; no GPU needed). Subprocesses, because this process's Triton is in interpreter mode.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "benchmarks" / "compile_gate.py"
sys.path.insert(0, str(GATE.parent))
import compile_gate  # noqa: E402  (stdlib-only at import)


def _compiler_env():
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def test_quick_gate_compiles_every_kernel_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "gate.json"
    run = subprocess.run([sys.executable, str(GATE), "--quick", "--json", str(out)], env=_compiler_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"the compile gate failed:\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(not r["problems"] and "error" not in r for r in rows)
    seen = {(r["op"], r["kernel"], r["arch"]) for r in rows}
    for arch in (80, 90):
        assert ("loss", "contrastive_fwd", arch) in seen and ("loss", "contrastive_probs", arch) in seen
        assert ("siglip", "siglip_fwd", arch) in seen and ("siglip", "siglip_grad", arch) in seen
        assert ("attention", "attention_fwd", arch) in seen and ("attention", "attention_bwd_dq", arch) in seen
    # 77 tokens: the fused backward on sm90, the split one on sm80; fp32 (forced) compiled too
    assert ("attention", "attention_bwd_fused", 90) in seen and ("attention", "attention_bwd_dkdv", 80) in seen
    assert {r["dtype"] for r in rows if r["op"] == "attention"} == {"bfloat16", "float32"}
    # the sigmoid loss's kernels in both half dtypes the ops table routes to Triton
    assert {r["dtype"] for r in rows if r["op"] == "siglip"} == {"bfloat16", "float16"}
    # both losses' forwards split 256 rows x 32768 columns over at least one program per SM (2 row blocks)
    fwd = [r for r in rows if r["kernel"] in ("contrastive_fwd", "siglip_fwd")]
    assert {r["kernel"] for r in fwd} == {"contrastive_fwd", "siglip_fwd"}
    assert all(r["grid"][0] == 2 and r["grid"][0] * r["grid"][1] >= compile_gate.SM_COUNT[r["arch"]] for r in fwd)


def test_gate_refuses_what_only_the_interpreter_accepts(tmp_path):
    # A kernel reading a plain module-level global: the interpreter runs it, the GPU compiler refuses it
    # (what happened to the loss forward). The gate must report the compile error.
    (tmp_path / "badkernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        _SCALE = 2.0

        @triton.jit
        def _bad_kernel(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs, mask=offs < n) * _SCALE, mask=offs < n)
    """))
    interpreted = textwrap.dedent("""
        import torch, badkernel
        x = torch.ones(40)
        badkernel._bad_kernel[(1,)](x, 40, BLOCK=64)
        assert torch.equal(x, torch.full((40,), 2.0))
        print("interpreter ok")
    """)
    compiled = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(GATE.parent)!r})
        import badkernel, compile_gate
        try:
            compile_gate.compile_launch(badkernel._bad_kernel, (torch.empty(64, device="meta"), 40), {{"BLOCK": 64}}, 80)
        except Exception as exc:
            print("refused:", str(exc).splitlines()[-1])
        else:
            print("compiled")
    """)
    env = dict(_compiler_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    a = subprocess.run([sys.executable, "-c", interpreted], env=dict(env, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert a.returncode == 0 and "interpreter ok" in a.stdout, a.stdout + a.stderr
    b = subprocess.run([sys.executable, "-c", compiled], env=env, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "refused:" in b.stdout and "global variable _SCALE" in b.stdout, b.stdout


def test_problems_flags_spills_shared_memory_and_errors():
    ok = {"dtype": "bfloat16", "arch": 80, "spill_bytes": 0, "shared": 96 * 1024}
    assert compile_gate.problems(ok) == []
    assert "spills 4 B" in compile_gate.problems(dict(ok, spill_bytes=4))[0]
    assert "spills" in compile_gate.problems(dict(ok, dtype="float32", spill_bytes=8))[0]  # no dtype is exempt
    assert "224.5 KiB" in compile_gate.problems(dict(ok, shared=int(224.5 * 1024)))[0]
    assert compile_gate.problems(dict(ok, arch=90, shared=int(224.5 * 1024))) == []  # sm90 has 227 KiB
    assert compile_gate.problems({"error": "NameError"}) == ["does not compile"]

"""The summary of a benchmarks/gpu_check.sh run: test outcomes, one line per benchmark row (from
rows.jsonl, which survives a cut-short run) with its roofline fraction, then the speed of the Triton rows
relative to their peers.

    python benchmarks/gpu_summary.py OUT_DIR
"""
from __future__ import annotations

import collections
import json
import os
import sys


def _lines(out: str, name: str) -> list[dict]:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def summary(out: str) -> str:
    text = []
    tests = _lines(out, "tests.jsonl")
    if tests:
        counts = collections.Counter(t["outcome"] for t in tests)
        text.append("tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        text += [f"  FAILED {t['test']}: {t.get('message', '')}" for t in tests if t["outcome"] == "failed"]
    rows = _lines(out, "rows.jsonl")
    if rows:
        text.append(f"\n{'benchmark':<72} {'ms/op':>9} {'TFLOP/s':>8} {'peak MB':>9} {'roofline':>9}")
    for r in rows:
        info = r["extra_info"]
        ms = info.get("ms_per_op", info.get("seconds", r["median_s"]) * 1e3)
        tflops = info.get("tflops", info.get("model_tflops"))
        if tflops is None and "gflops_4gemm" in info:
            tflops = info["gflops_4gemm"] / 1e3
        mem = info.get("peak_mem_mb", info.get("peak_extra_mb", info.get("peak_memory_mb")))
        frac = info.get("roofline_fraction")
        text.append(f"{r['benchmark'].split('::')[-1][:72]:<72} {ms:>9.4f} {_num(tflops):>8} {_num(mem):>9} "
                    f"{_num(frac, '{:.0%}'):>9}")
    attn = [r["extra_info"] for r in rows if {"provider", "shape", "pass", "ms_per_op"} <= r["extra_info"].keys()]
    if any(r["provider"] == "triton" for r in attn):
        table = {(r["shape"], r["pass"], r["provider"]): r["ms_per_op"] for r in attn}
        peers = sorted({r["provider"] for r in attn} - {"triton"})
        text.append("\nattention: peer time / triton time (> 1: triton is faster)")
        text.append(f"{'shape':<20} {'pass':<8} " + " ".join(f"{p:>15}" for p in peers))
        for shape, pass_ in sorted({(r["shape"], r["pass"]) for r in attn}):
            ours = table.get((shape, pass_, "triton"))
            cells = [f"{table[(shape, pass_, p)] / ours:>14.2f}x" if ours and (shape, pass_, p) in table
                     else f"{'-':>15}" for p in peers]
            text.append(f"{shape:<20} {pass_:<8} " + " ".join(cells))
    loss = {}
    for r in rows:
        info = r["extra_info"]
        if "gflops_4gemm" in info and info.get("device") != "cpu":
            loss.setdefault((info["n"], info["d"]), {})[info["provider"]] = info["seconds"]
    for (n, d), times in sorted(loss.items()):
        if "triton" in times:
            text.append(f"\nloss fwd+bwd N={n} d={d}: " + ", ".join(
                f"{p} {s * 1e3:.2f} ms ({s / times['triton']:.2f}x triton's)" for p, s in times.items()))
    return "\n".join(text)


if __name__ == "__main__":
    print(summary(sys.argv[1]))

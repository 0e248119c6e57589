"""The device check's plumbing, without a GPU: benchmarks/gpu_check.sh parses, its JSON-lines reporter
(benchmarks/jsonl_report.py) writes one line per finished test and benchmark as the run goes, and the
summary (benchmarks/gpu_summary.py) reads those lines, rooflines and peers included."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_summary  # noqa: E402


def test_gpu_check_script_parses_and_states_its_budget():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    text = (BENCH / "gpu_check.sh").read_text()
    assert "GPU_CHECK_DEADLINE:-240" in text and "--quick" in text


def test_jsonl_reporter_writes_each_test_and_benchmark_as_it_finishes(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        def test_bench(benchmark):
            benchmark.extra_info["ms_per_op"] = 1.5
            benchmark.pedantic(lambda: None, rounds=2, iterations=1)
    """))
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, CLIPFORGE_JSONL=str(out), PYTHONPATH=f"{BENCH}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "jsonl_report",
                          str(tmp_path / "test_sample.py")], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # one test fails on purpose
    records = [json.loads(line) for line in out.read_text().splitlines()]
    outcomes = {r["test"].split("::")[-1]: r for r in records if "test" in r}
    assert outcomes["test_passes"]["outcome"] == "passed"
    assert outcomes["test_fails"]["outcome"] == "failed" and "one is not two" in outcomes["test_fails"]["message"]
    assert outcomes["test_skipped"]["outcome"] == "skipped"
    bench = [r for r in records if "benchmark" in r]
    assert len(bench) == 1 and bench[0]["extra_info"] == {"ms_per_op": 1.5} and bench[0]["rounds"] == 2


def test_summary_reads_rows_rooflines_and_peers(tmp_path):
    (tmp_path / "tests.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"test": "tests/test_a.py::test_x", "outcome": "passed", "seconds": 1.0},
        {"test": "tests/test_a.py::test_y", "outcome": "failed", "seconds": 1.0, "message": "AssertionError: no"},
    ]) + "\n")
    attn = dict(shape="vit-b32-s50", **{"pass": "fwd"})
    rows = [
        {"benchmark": "b.py::test_attention[vit-b32-s50-triton-fwd]", "median_s": 1e-3,
         "extra_info": dict(attn, provider="triton", ms_per_op=0.05, tflops=300.0, roofline_fraction=0.4)},
        {"benchmark": "b.py::test_attention[vit-b32-s50-sdpa-flash-fwd]", "median_s": 1e-3,
         "extra_info": dict(attn, provider="sdpa-flash", ms_per_op=0.06, tflops=250.0)},
        {"benchmark": "c.py::test_cuda[32768-768-triton]", "median_s": 0.01,
         "extra_info": {"n": 32768, "d": 768, "provider": "triton", "seconds": 0.0105, "gflops_4gemm": 6.3e5,
                        "device": "NVIDIA H200"}},
        {"benchmark": "c.py::test_cuda[32768-768-mm4]", "median_s": 0.01,
         "extra_info": {"n": 32768, "d": 768, "provider": "mm4", "seconds": 0.0084, "gflops_4gemm": 7.9e5,
                        "device": "NVIDIA H200"}},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = gpu_summary.summary(str(tmp_path))
    assert "1 failed, 1 passed" in text and "FAILED tests/test_a.py::test_y: AssertionError: no" in text
    assert "40%" in text  # the roofline fraction
    assert "1.20x" in text  # sdpa-flash takes 1.2 x triton's time
    assert "mm4 8.40 ms (0.80x triton's)" in text
    assert gpu_summary.summary(str(tmp_path / "missing")) == ""

"""A pytest plugin that appends one JSON line per finished test (and per benchmark) as the run goes.

    CLIPFORGE_JSONL=out.jsonl python -m pytest -p jsonl_report ...   (benchmarks/ on PYTHONPATH)

benchmarks/gpu_check.sh loads it so that a device run cut short by its time limit still returns what
finished: pytest-benchmark's --benchmark-json is written only when a session ends. Each line: the test
id, its outcome and duration, the first line of a failure, and for a benchmark its median seconds and
extra_info (ms per op, TFLOP/s, peak memory, roofline).
"""
from __future__ import annotations

import json
import os

import pytest


def _write(record: dict) -> None:
    path = os.environ.get("CLIPFORGE_JSONL")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def pytest_runtest_logreport(report):
    # one line per test: its call, or the setup that skipped or failed it
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        record = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.outcome != "passed" and report.longrepr is not None:
            crash = getattr(report.longrepr, "reprcrash", None)  # a failure: its exception line
            text = crash.message if crash is not None else str(report.longrepr)  # a skip: (file, line, reason)
            record["message"] = (text.strip().splitlines() or [""])[0][:500]
        _write(record)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when != "call":
        return
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is None:
        return
    _write({"benchmark": item.nodeid, "median_s": stats.median, "rounds": stats.rounds,
            "extra_info": dict(bench.extra_info)})

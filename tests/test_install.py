"""A non-editable install into a fresh virtual environment, used from a folder outside the checkout.

The installed package must never read the repository tree at run time (run configs, benchmark results,
caches): what it needs ships as package data. The test builds a wheel of the working tree with pip
(`--no-build-isolation --no-deps --no-index`: offline, against the installed torch), installs it into a
new venv whose only other packages are this environment's dependencies, and runs `clipforge plan` and
a short `python -m clipforge.demo` (deepspeed launcher, 2 ranks) from a temporary folder, with an audit
hook in that venv that records every file opened or listed under the checkout.

- The venv is made without pip and without system site-packages; a .pth file adds this environment's
  site-packages (torch, deepspeed, DALI, pip, setuptools ...). Paths in that .pth are added to
  sys.path as they are: the .pth files inside them, among them the editable install's finder for
  clipforge, are not processed, so the only clipforge the venv sees is the one it installs.
- pip builds from a copy of the working tree (not from the checkout itself, which an in-tree build
  would fill with build/ and *.egg-info). The copy and the venv (recreated each time) live at fixed
  paths under .cache/test_install/ and the copy's build/temp.* folder is kept: the compile commands are
  then the same from run to run, and ninja recompiles only the C++ sources that changed (on 2 cores the
  install takes ~75 s with a cold build of the extension, ~8 s warm; the whole test ~130 s cold, ~55 s
  warm). build/lib* is cleared every time, so no stale module can reach the wheel.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGING = os.path.join(ROOT, ".cache", "test_install")
# what a wheel build needs is engine/, kernels/, csrc/ and setup.py; these stay out of the copy
_SKIP_TOP = {".git", ".venv", ".cache", ".whl", ".ci", ".benchmarks", ".pytest_cache", "build", "runs", "data",
             "tests", "benchmarks", "docs", "configs"}

# Loaded by every interpreter of the test venv (pip's build included); active only when the variable
# names a log file: then every file opened, listed or globbed under the checkout is written there, except
# the dependencies' environment and the compiled-extension cache the test hands over.
_AUDIT = '''import os, sys
_log = os.environ.get("CLIPFORGE_TEST_AUDIT_LOG")
if _log:
    _root = os.environ["CLIPFORGE_TEST_AUDIT_ROOT"]
    _roots = tuple({os.path.abspath(_root) + os.sep, os.path.realpath(_root) + os.sep})
    _allowed = tuple(q for p in os.environ["CLIPFORGE_TEST_AUDIT_ALLOW"].split(os.pathsep)
                     for q in {os.path.abspath(p) + os.sep, os.path.realpath(p) + os.sep})
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _hook(event, args):
        if event not in ("open", "os.listdir", "os.scandir", "glob.glob") or not args:
            return
        path = args[0]
        if path is None or isinstance(path, int):
            return
        try:
            path = os.path.abspath(os.fsdecode(path)) + os.sep
        except (TypeError, ValueError):
            return
        if path.startswith(_roots) and not path.startswith(_allowed):
            os.write(_fd, f"{os.getpid()} {event} {path[:-1]}\\n".encode())

    sys.addaudithook(_hook)
'''


def _ignore(folder, names):
    skipped = {n for n in names if n == "__pycache__" or n.endswith((".so", ".pyc", ".egg-info"))}
    if os.path.abspath(folder) == ROOT:
        skipped |= _SKIP_TOP & set(names)
    return skipped


def _sync_source(src: str) -> None:
    """Make `src` a copy of the working tree (file times kept), keeping only build/temp.* from before."""
    if os.path.isdir(src):
        for name in os.listdir(src):
            if name != "build":
                path = os.path.join(src, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        build = os.path.join(src, "build")
        for name in os.listdir(build) if os.path.isdir(build) else []:
            if not name.startswith("temp."):
                shutil.rmtree(os.path.join(build, name), ignore_errors=True)
    shutil.copytree(ROOT, src, ignore=_ignore, dirs_exist_ok=True)


def _run(cmd, *, cwd, env, timeout):
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    print(f"[{time.time() - t0:5.1f}s] {' '.join(map(str, cmd))[:160]}")  # shown with -rA, or on failure
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.fixture
def staging():
    """The fixed folder of the source copy and the venv (fixed paths: the compile commands name them, so
    ninja can reuse the objects), held by one test process at a time."""
    os.makedirs(STAGING, exist_ok=True)
    with open(os.path.join(STAGING, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield STAGING


@pytest.mark.slow
def test_wheel_install_runs_plan_and_demo_outside_the_checkout(staging, tmp_path):
    venv, work = Path(staging) / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)  # a fresh one
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    with open(os.path.join(site, "_clipforge_test_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(_AUDIT)

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    path = [str(venv / "bin")] + [p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not os.path.realpath(p).startswith(ROOT + os.sep)]
    env.update(PATH=os.pathsep.join(path), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    missing = subprocess.run([python, "-c", "import clipforge"], cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    assert missing.returncode != 0 and "No module named 'clipforge'" in missing.stderr, "the editable install leaked"

    src = os.path.join(staging, "src")
    _sync_source(src)
    # PATH as the caller had it: the build may use ninja from the dependencies' environment. No debug
    # information (-g0 after the interpreter's -g): the cold build of the extension takes ~40% less time.
    build_env = dict(env, PATH=os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")]),
                     CFLAGS=f"{os.environ.get('CFLAGS', '')} -g0".strip())
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-q", src],
         cwd=work, env=build_env, timeout=1500)

    # the installed package, from the venv, with its extension and package data
    info = json.loads(_run([python, "-c", (
        "import json, os, sys, clipforge, clipforge._C, clipforge.demo\n"
        "print(json.dumps({'file': clipforge.__file__, 'ext': clipforge._C.__file__, 'path': sys.path,\n"
        "                  'config': clipforge.demo.default_config()}))")], cwd=work, env=env, timeout=300))
    for key in ("file", "ext", "config"):
        assert os.path.realpath(info[key]).startswith(os.path.realpath(site) + os.sep), (key, info[key])
    assert not [p for p in info["path"] if p and os.path.realpath(p) in (ROOT, os.path.join(ROOT, "engine"))]
    installed = os.path.dirname(info["file"])
    for folder, _, files in os.walk(installed):
        for name in files:
            if name.endswith((".py", ".yaml", ".json", ".txt")):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    assert ROOT not in f.read(), f"{name} names the checkout's path"

    # run time, audited: nothing under the checkout but the dependencies' environment and the
    # compiled-extension cache (DeepSpeed's CPU op) may be opened or listed
    audit = tmp_path / "audit.log"
    extensions = env.get("TORCH_EXTENSIONS_DIR") or os.path.join(ROOT, ".cache", "torch_extensions")
    env.update(TORCH_EXTENSIONS_DIR=extensions, OMP_NUM_THREADS="1", CLIPFORGE_TEST_AUDIT_LOG=str(audit),
               CLIPFORGE_TEST_AUDIT_ROOT=ROOT,
               CLIPFORGE_TEST_AUDIT_ALLOW=os.pathsep.join([str(venv), sys.prefix, *deps, extensions]))
    _run([python, "-c", f"open({os.path.join(ROOT, 'setup.py')!r}).close()"], cwd=work, env=env, timeout=60)
    assert audit.read_text().split()[1:] == ["open", os.path.join(ROOT, "setup.py")], "the audit hook is not active"
    audit.unlink()

    out = _run([str(venv / "bin" / "clipforge"), "plan", "--model", "ViT-B-32", "--gpu", "A100-40GB", "--gpus", "8",
                "--batch", "32768"], cwd=work, env=env, timeout=600)
    assert "clipforge plan: ViT-B-32 on 8 x A100-40GB" in out and "recommended: ZeRO" in out
    assert "assumed: no --mfu or --results given" in out

    run = work / "run"
    out = _run([python, "-m", "clipforge.demo", "--data-dir", str(work / "data"), "--output-dir", str(run),
                "--max-steps", "10", "--set", "schedule.warmup_steps=2"], cwd=work, env=env, timeout=900)
    assert "zero-shot top-1 on" in out and "(missing!)" not in out
    with open(run / "train.log") as f:
        launch = f.readline().split()
    assert launch[:3] == [python, "-m", "deepspeed.launcher.runner"]  # the ranks ran the venv's interpreter
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if line.strip()] == list(range(1, 11))
    assert os.path.getsize(run / "model.safetensors") > 0

    opened = audit.read_text() if audit.exists() else ""
    assert not opened, f"the installed clipforge read the checkout at run time:\n{opened[:4000]}"

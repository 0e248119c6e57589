"""docs/CONFIG.md is the current run-config reference: generated from the dataclasses, every key listed
with a type, a default and a meaning (issue 19, point 7)."""
import dataclasses
import os
import subprocess
import sys

from clipforge.train.config import TrainConfig
from clipforge.train.config_reference import _rows, main, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "CONFIG.md")


def _keys(cls, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out += _keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def test_the_checked_in_reference_is_current():
    assert main(["--check", DOC]) == 0, ("docs/CONFIG.md is stale: run python -m clipforge.train.config_reference "
                                         "--write docs/CONFIG.md")


def test_every_key_is_listed_with_a_meaning():
    text = reference()
    keys = _keys(TrainConfig)
    assert len(keys) > 80
    for key in keys:
        assert f"| `{key}` |" in text, key
    from clipforge.model.config import CLIPConfig

    rows = _rows(TrainConfig, "") + _rows(CLIPConfig, "model.overrides.")
    silent = [k for k, _, _, meaning in rows if not meaning]
    assert not silent, f"keys without a comment in their dataclass: {silent}"


def test_a_stale_reference_fails_the_check(tmp_path, capsys):
    stale = tmp_path / "CONFIG.md"
    stale.write_text(reference().replace("| `seed` |", "| `sed` |"))
    assert main(["--check", str(stale)]) == 1
    assert "not current" in capsys.readouterr().err


def test_train_help_points_to_the_reference():
    out = subprocess.run([sys.executable, "-m", "clipforge.train", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "docs/CONFIG.md" in out and "clipforge.train.config_reference" in out

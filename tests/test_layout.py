"""The layout's rules (docs/DESIGN.md), checked by walking every module's imports, top-level and lazy."""
import ast
import os

import pytest

ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine")
MAX_LINES = 550
# the one lazy edge against the arrows: the model's embedding convenience methods call serve/ on use
LAZY_ALLOWED = {("clipforge.model.clip", "clipforge.serve.embed"), ("clipforge.model.clip", "clipforge.serve")}


def _modules():
    for root, _, files in os.walk(ENGINE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, ENGINE)[:-3].replace(os.sep, ".")
                rel = rel[: -len(".__init__")] if rel.endswith("__init__") else rel
                yield ("clipforge." + rel).rstrip("."), path


def _imports(module: str, path: str):
    """(imported clipforge module, is top-level) for every import statement of the file."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("clipforge"):
                yield name, id(node) in top


def _edges():
    known = {m for m, _ in _modules()}
    for module, path in _modules():
        for target, top in _imports(module, path):
            if target in known:  # `from .x import name`: keep the module part only
                yield module, target, top


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_model_and_data_import_nothing_from_train_or_serve():
    bad = [(m, t, top) for m, t, top in _edges()
           if (_in(m, "clipforge.model") or _in(m, "clipforge.data"))
           and (_in(t, "clipforge.train") or _in(t, "clipforge.serve"))
           and not (not top and (m, t) in LAZY_ALLOWED)]
    assert not bad, bad


def test_model_uses_no_data_and_data_only_the_input_contract_of_model():
    """data/ takes from model/ only what a model's input is: its tokenizer and its image transforms."""
    edges = list(_edges())
    assert not [(m, t) for m, t, _ in edges if _in(m, "clipforge.model") and _in(t, "clipforge.data")]
    assert not [(m, t) for m, t, _ in edges if _in(m, "clipforge.data") and _in(t, "clipforge.model")
                and t not in ("clipforge.model.tokenizer", "clipforge.model.transforms")]


def test_nothing_imports_train_but_the_cli_and_the_demo():
    bad = [(m, t) for m, t, _ in _edges() if _in(t, "clipforge.train") and not _in(m, "clipforge.train")
           and m not in ("clipforge.cli", "clipforge.demo")]
    assert not bad, bad


def test_the_core_imports_no_subsystem():
    core = {"clipforge.ops", "clipforge.config", "clipforge.loss", "clipforge.siglip_loss", "clipforge.reference", "clipforge.version"}
    subsystems = ("clipforge.model", "clipforge.data", "clipforge.train", "clipforge.serve")
    bad = [(m, t) for m, t, _ in _edges() if m in core and any(_in(t, s) for s in subsystems)]
    assert not bad, bad


def test_the_walk_sees_the_imports():
    # the checks above mean something only if the walk finds real edges, lazy ones included
    edges = {(m, t, top) for m, t, top in _edges()}
    assert ("clipforge.train.trainer", "clipforge.data.loaders", True) in edges
    assert ("clipforge.model.clip", "clipforge.serve", False) in edges


@pytest.mark.parametrize("module,path", sorted(_modules()))
def test_no_engine_file_is_over_the_limit(module, path):
    with open(path) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f"{module} has {lines} lines (limit {MAX_LINES}): split it along its concerns"


def test_import_clipforge_loads_no_subsystem_it_does_not_need():
    import subprocess
    import sys

    code = ("import sys, clipforge\n"
            "print(sorted(m for m in sys.modules if m.startswith(('clipforge.train', 'clipforge.serve', "
            "'clipforge.data'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_public_names_keep_working():
    """What users and docs rely on survives the move (internal paths simply moved)."""
    import importlib
    import importlib.util

    import clipforge

    for name in ("create_model", "load", "save", "tokenize", "contrastive_loss", "ContrastiveLoss", "CLIP",
                 "CLIPConfig", "VisionConfig", "TextConfig", "get_preset", "__version__", "list_models",
                 "create_model_and_transforms", "get_tokenizer", "image_transform"):
        assert hasattr(clipforge, name), name
    assert callable(importlib.import_module("clipforge.kernels").attention)
    assert callable(importlib.import_module("clipforge.kernels.attention").attention)
    for module, names in {"clipforge.data": ("DataConfig", "DataError", "build_train_loader", "build_eval_loader",
                                             "CLIP_MEAN", "CLIP_STD", "normalize_uint8", "pil_transform"),
                          "clipforge.model": ("CLIP", "create_model", "num_parameters"),
                          "clipforge.train": ("main", "train"),
                          "clipforge.loss": ("contrastive_loss", "contrastive_loss_and_grads"),
                          "clipforge.ops": ("attention", "chunked_topk", "select_contrastive_backend")}.items():
        mod = importlib.import_module(module)
        assert all(hasattr(mod, n) for n in names), module
    for entry in ("clipforge.train.__main__", "clipforge.demo", "clipforge.cli"):
        assert importlib.util.find_spec(entry) is not None, entry

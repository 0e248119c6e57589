"""Zero-shot classification: prompt templates and class-name handling.

The classifier itself is `clipforge.serve.embed.zero_shot_classifier` (also `model.zero_shot_classifier`): every
class name is written into every template, the normalised text embeddings are averaged per class and
normalised again (prompt ensembling, CLIP paper section 3.1.4). Template sets ship as JSON in
`clipforge/assets/templates/` (each `{"name", "description", "templates": [...]}`):

    imagenet     the paper's 80 ImageNet templates ("a bad photo of a {}.", ...), in the published order
    imagenet-7   the 7-template subset OpenAI's notebook selected
    cifar        the paper's 18 CIFAR templates
    generic      15 photo / drawing templates for any domain
    simple       "a photo of a {}."
    digits       the MNIST prompt and variants
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence


_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "templates")


@functools.lru_cache(maxsize=None)
def _shipped() -> dict[str, tuple[str, ...]]:
    sets = {}
    for fname in sorted(os.listdir(_TEMPLATE_DIR)):
        if fname.endswith(".json"):
            sets[fname[:-5]] = tuple(_read_template_file(os.path.join(_TEMPLATE_DIR, fname)))
    return sets


def template_sets() -> dict[str, list[str]]:
    """The shipped template sets: {name: [template, ...]}."""
    return {k: list(v) for k, v in _shipped().items()}


def _read_template_file(path: str) -> list[str]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read templates from {path}: {exc}") from None
    templates = data.get("templates") if isinstance(data, dict) else data
    if not isinstance(templates, list):
        raise ValueError(f"{path} must hold a JSON list of templates or an object with a \"templates\" list")
    return check_templates(templates, where=path)


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """Validate templates: a non-empty list of strings, each holding exactly one "{}" for the class name."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: the template list is empty; give at least one, e.g. \"a photo of a {{}}.\"")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ValueError(f"{where}: template {t!r} must be a string with exactly one '{{}}' for the class name "
                             "and no other braces")
    return templates


def get_templates(spec="imagenet") -> list[str]:
    """Templates from a shipped set name, a JSON file path, one template string with "{}", or a list of templates."""
    if isinstance(spec, str):
        sets = _shipped()
        if spec in sets:
            return list(sets[spec])
        if os.path.isfile(spec):
            return _read_template_file(spec)
        if "{}" in spec:
            return check_templates([spec])
        raise ValueError(f"unknown template set {spec!r}: use one of {', '.join(sets)}, a JSON file, or a "
                         "template such as \"a photo of a {}.\"")
    return check_templates(spec)


def check_classnames(classnames: Sequence[str]) -> list[str]:
    """Validate class names: non-empty, non-blank strings, no duplicates (which would make two classes one)."""
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of class names, not one string")
    names = list(classnames)
    if not names:
        raise ValueError("the class list is empty; give at least two class names")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class {i} is {name!r}; every class name must be a non-empty string")
        key = name.strip().lower()
        if key in seen:
            raise ValueError(f"duplicate class name {name!r} (classes {seen[key]} and {i}); class names must be unique, "
                             "or the classifier cannot tell them apart")
        seen[key] = i
    return [n.strip() for n in names]


def read_classnames(spec: str | Sequence[str]) -> list[str]:
    """Class names from a file (one per line, blank lines ignored, or a JSON list), a comma-separated string, or a list."""
    if not isinstance(spec, str):
        return check_classnames(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        if spec.endswith(".json"):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{spec} is not valid JSON: {exc}") from None
            if isinstance(names, dict):
                raise ValueError(f"{spec}: give class names as a JSON list in label order")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{spec} holds no class names")
        return check_classnames(names)
    if os.sep in spec or spec.endswith((".txt", ".json")):
        raise FileNotFoundError(f"class-name file not found: {spec}")
    return check_classnames([s for s in spec.split(",")])

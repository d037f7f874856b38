"""Dependencies declared as used: every third-party module bigasp imports is declared in pyproject.toml.

An undeclared import works on the developer's machine (pulled in by something else) and breaks the
day that something drops it; a declared but unused dependency costs every user an install.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imported but deliberately not declared, with the reason.
UNDECLARED_OK = {
    "click": "typer is built on click and pins a compatible version; bigasp only catches its exceptions",
    "spacy": "optional noun-chunk merging of `dataset report --noun-chunks`; used only when installed",
    "werkzeug": "the HTTP server of moto[server] (dev extra), used only by `bench load --local-s3`",
    "vllm": "optional GPU captioning backend (annotate caption.backend = 'vllm'); used only when installed",
}
# Declared but never imported by bigasp, with the reason.
UNIMPORTED_OK = {
    "accelerate": "diffusers loads weights through it (low_cpu_mem_usage, init_empty_weights)",
    "rich": "typer renders bigasp's --help with it (rich_markup_mode='rich')",
    "tokenizers": "transformers' fast CLIP tokenizer backend",
    "tensorboard": "reached through torch.utils.tensorboard (tracking extra)",
    "pytest": "test runner",
    "s3fs": "fsspec loads it for s3:// URLs (the `s3` extra); bigasp never imports it by name",
    "moto": "a real S3 API server on localhost for the tests (dev extra)",
    "ruff": "linter",
    "playwright": "browser fixtures in tests/conftest.py (imported by tests, not src)",
    "webdataset": "tests write tar shards with webdataset.TarWriter, the layout bigasp ingests from URLs",
    "jsonschema": "validates the ComfyUI canvas workflow against the frontend's recorded schema (tests)",
    "pytest-xdist": "`make test` runs the suite in two processes (dev extra)",
    "lycoris-lora": "tests check bigasp's LoKr/LoHa merge against LyCORIS' own diff_weight (dev extra)",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def _imported_modules() -> set[str]:
    mods: set[str] = set()
    for path in (REPO / "src" / "bigasp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"bigasp"}


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for mod in sorted(_imported_modules()):
        names = {_norm(d) for d in dists.get(mod, [mod])}
        if not names & declared and mod not in UNDECLARED_OK:
            missing[mod] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_package_is_imported_or_explained():
    dists = packages_distributions()
    used = {_norm(d) for mod in _imported_modules() for d in dists.get(mod, [mod])}
    unexplained = sorted(d for d in _declared() if d not in used and d not in UNIMPORTED_OK)
    assert not unexplained, f"declared but never imported (drop them or say why): {unexplained}"


def test_diffusers_sees_accelerate():
    """The reason accelerate stays declared: without it diffusers first builds every model with random
    weights and then overwrites them (twice the memory and time for the UNet)."""
    from diffusers.utils import is_accelerate_available

    assert is_accelerate_available()

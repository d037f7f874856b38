"""Command groups are assembled at the top (`bigasp.cli`): a lower layer never imports a higher
one's commands, and the storage layer imports no higher layer at all.

The check walks every module's source (imports inside functions included, since the command
modules import lazily) rather than importing the package, so it sees imports that never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bigasp

PKG = Path(bigasp.__file__).parent

# Lower number = lower layer. Packages not listed (errors, fsutil, text, ...) are shared helpers.
RANK = {
    "store": 0,
    "prep": 1,
    "train": 2,
    "report": 3,
    "annotate": 3,
    "quality": 3,
    "sample": 3,
    "models": 3,
    "bench": 3,
    "cli": 4,
    "demo": 4,  # drives the whole pipeline through the CLI, as a user would
}


def _is_commands(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf == "cli" or "command" in leaf


def _imports(path: Path, mod: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in one file (module `mod`)."""
    tree = ast.parse(path.read_text(), str(path))
    here = mod.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            out.append((node.lineno, base, names))
            out += [(node.lineno, f"{base}.{n}", []) for n in names]  # `from pkg import commands`
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "bigasp" or len(parts) < 2:
        return None
    return parts[1]


def _modules() -> list[tuple[Path, str]]:
    return [(p, ".".join(p.relative_to(PKG.parent).with_suffix("").parts)) for p in sorted(PKG.rglob("*.py"))]


def _violations(modules: list[tuple[Path, str]]) -> list[str]:
    bad = []
    for path, mod in modules:
        own = _package(mod)
        own_rank = RANK.get(own or "")
        if own_rank is None:
            continue
        for line, target, names in _imports(path, mod):
            other = _package(target)
            if other is None or other == own or other not in RANK:
                continue
            where = f"{mod}:{line} imports {target}"
            if own == "store":
                bad.append(f"{where} (the storage layer imports no higher layer)")
            elif RANK[other] > own_rank and _is_commands(target):
                bad.append(f"{where} (a lower layer imports a higher layer's commands)")
            elif own != "cli" and any(n.endswith("_app") for n in names):
                bad.append(f"{where} (only bigasp.cli mounts another package's command group)")
    return bad


def test_no_lower_layer_imports_a_higher_layers_commands():
    modules = _modules()
    assert len(modules) > 100  # the walk found the package
    assert _violations(modules) == []


def test_the_check_sees_each_kind_of_violation(tmp_path):
    """The walker is not vacuous: the three shapes of the old circle are each caught."""
    cases = {
        "bigasp.store.commands": "def f():\n    from bigasp.train.data_commands import data_config_for\n",
        "bigasp.train.data_commands": "from bigasp.store.commands import dataset_app\n",
        "bigasp.annotate.commands": "def r():\n    from bigasp.bench.commands import bench_app\n",
        "bigasp.prep.thing": "def f():\n    from ..report import commands\n",
    }
    for k, (mod, src) in enumerate(cases.items()):
        path = tmp_path / f"m{k}.py"
        path.write_text(src)
        assert _violations([(path, mod)]), mod
    ok = tmp_path / "ok.py"
    ok.write_text("from bigasp.train.data_commands import load_data_config\n")
    assert _violations([(ok, "bigasp.report.commands")]) == []  # higher imports lower: fine


def test_dataset_group_has_all_its_commands():
    """Assembled in cli.py: the group still offers every layer's commands."""
    from bigasp.cli import app

    group = next(g.typer_instance for g in app.registered_groups if g.name == "dataset")
    names = {c.name for c in group.registered_commands}
    assert names == {"info", "verify", "import-bigasp", "preview", "batches", "report"}
    bench = next(g.typer_instance for g in app.registered_groups if g.name == "bench")
    assert "annotate" in {c.name for c in bench.registered_commands}

"""Danbooru tag-alias table: statuses, duplicates, conflicts, chains, cycles, file errors."""

from __future__ import annotations

import gzip
import json

import pytest

from bigasp.errors import DataError
from bigasp.text.aliases import AliasTable


def row(a: str, c: str, status: str = "active", **extra) -> str:
    return json.dumps({"antecedent_name": a, "consequent_name": c, "status": status, "id": 1, **extra})


def test_only_active_rows_and_groups_are_sorted():
    t = AliasTable.parse(
        [
            row("ff7", "final_fantasy_vii"),
            row("ffvii", "final_fantasy_vii"),
            row("old_name", "final_fantasy_vii", "deleted"),
            row("gone", "final_fantasy_vii", "retired"),
            row("maybe", "final_fantasy_vii", "pending"),
            "",
            row("Long Hair", "very_long_hair"),
        ]
    )
    assert t.stats.active == 3 and t.stats.inactive == 3 and t.stats.rows == 6
    assert t.groups == {"final_fantasy_vii": ("ff7", "ffvii"), "very_long_hair": ("long_hair",)}
    assert t.alternatives("final_fantasy_vii") == ("ff7", "ffvii")
    # an alias gets the canonical name and the other aliases; lookup normalises spaces/case
    assert t.alternatives("ff7") == ("final_fantasy_vii", "ffvii")
    assert t.alternatives("Final Fantasy VII") == ("ff7", "ffvii")
    assert t.alternatives("old_name") == ()
    assert t.alternatives("unknown") == ()


def test_duplicates_and_self_aliases_are_skipped_and_conflicts_rejected():
    t = AliasTable.parse([row("a", "b"), row("a", "b"), row("c", "c")])
    assert t.stats.duplicates == 1 and t.stats.self_aliases == 1
    assert t.canonical_of == {"a": "b"}
    with pytest.raises(DataError, match=r"'a'.*'b' \(line 1\).*'x' \(line 3\)"):
        AliasTable.parse([row("a", "b"), row("q", "r"), row("a", "x")], source="dump.json")
    # an inactive conflicting row is no conflict
    assert AliasTable.parse([row("a", "b"), row("a", "x", "deleted")]).canonical_of == {"a": "b"}


def test_chains_resolve_to_the_end_and_cycles_are_errors():
    t = AliasTable.parse([row("a", "b"), row("b", "c"), row("d", "c")])
    assert t.canonical_of == {"a": "c", "b": "c", "d": "c"}
    assert t.groups == {"c": ("a", "b", "d")}
    assert t.stats.chained == 1
    with pytest.raises(DataError, match="cycle"):
        AliasTable.parse([row("a", "b"), row("b", "c"), row("c", "a")])


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "tag_aliases000000000000.json"
    p.write_text(row("a", "b") + "\n{not json\n")
    with pytest.raises(DataError, match=r"tag_aliases000000000000\.json:2"):
        AliasTable.load(p)
    p.write_text(json.dumps({"antecedent_name": "a", "status": "active"}) + "\n")
    with pytest.raises(DataError, match=":1"):
        AliasTable.load(p)


def test_load_plain_and_gzip_and_missing(tmp_path):
    lines = "\n".join([row("ff7", "final_fantasy_vii"), row("x", "y", "deleted")]) + "\n"
    plain = tmp_path / "a.json"
    plain.write_text(lines)
    gz = tmp_path / "a.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(lines)
    assert AliasTable.load(plain).groups == AliasTable.load(gz).groups == {"final_fantasy_vii": ("ff7",)}
    with pytest.raises(DataError, match="aliases_path"):
        AliasTable.load(tmp_path / "missing.json")


def test_shipped_danbooru_table_loads_with_its_licence_and_source():
    """The table the bigASP recipes use: known aliases of the source CSV (tagcomplete's danbooru.csv,
    e.g. `1girl,0,6008644,"1girls,sole_female"`), minus autocomplete abbreviations and aliases that
    are tags themselves; shipped as package data with its MIT licence and provenance note."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from bigasp.text.aliases import BUILTIN_DANBOORU, shipped_table_path

    t = AliasTable.load(BUILTIN_DANBOORU)
    assert len(t) == 29_600 and len(t.groups) == 23_812 and t.stats.chained == 0
    assert t.source == BUILTIN_DANBOORU
    assert t.groups["1girl"] == ("1girls", "sole_female")
    assert t.groups["highres"] == ("high_res", "high_resolution", "hires")
    assert t.groups["breasts"] == ("boobs", "breast", "breats", "oppai", "tits")
    assert t.alternatives("longhair") == ("long_hair",)
    assert t.canonical_of["pokémon"] == "pokemon"  # non-ASCII spellings kept
    assert "/lh" not in t.canonical_of and "/b" not in t.canonical_of  # abbreviations dropped
    assert "pink_pillow" not in t.canonical_of  # a tag in its own right, not a spelling of "pillow"
    assert t.alternatives("watermark") == ("watermarked",)  # copyright_notice is a tag in its own right

    folder = shipped_table_path().parent
    assert (
        "MIT License" in (folder / "LICENSE.txt").read_text()
        and "Dominik Reh" in (folder / "LICENSE.txt").read_text()
    )
    readme = (folder / "README.txt").read_text()
    assert (
        "DominikDoom/a1111-sd-webui-tagcomplete" in readme
        and "4170882f90b47be130a0ff9314f663c230b9153d" in readme
    )
    repo = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "bigasp"
    ]
    for f in ("tag_aliases.jsonl.gz", "LICENSE.txt", "README.txt"):
        rel = (folder / f).relative_to(repo / "src" / "bigasp").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)

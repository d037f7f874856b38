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

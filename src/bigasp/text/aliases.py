"""Danbooru tag aliases: which spellings of a tag a user might type, for prompt mutation.

Input is Danbooru's public `tag_aliases` export (BigQuery/GCS dump): one JSON object per
line with at least `antecedent_name` (the alias), `consequent_name` (the canonical tag) and
`status`. bigASP read the same file (`tag_aliases000000000000.json`).

Rules (bigASP's `read_tag_aliases`, made explicit and less brittle):

* only `status == "active"` rows count; deleted, retired, pending, ... are skipped and counted;
* names are normalised as Danbooru stores them: stripped, lowercase, spaces -> underscores;
* a self-alias (a -> a) is skipped and counted (bigASP asserted none exist);
* the same active row twice is one alias; one antecedent with two *different* active
  consequents is ambiguous and a `DataError` naming both lines (bigASP asserted too);
* chains (a -> b, b -> c) are followed to the end (a joins c's group); bigASP asserted that
  none exist, a later dump may have some; a cycle is a `DataError`.

Each canonical tag and its aliases form a group. `alternatives(tag)` returns the other
members of `tag`'s group (sorted, so a keyed RNG picks the same one everywhere), whether
`tag` is the canonical name or one of its aliases.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from bigasp.errors import DataError

# The table shipped in the package (data/danbooru/: table, README.txt with source, LICENSE.txt),
# derived from a Danbooru tag dump by scripts/build_danbooru_aliases.py.
BUILTIN_DANBOORU = "builtin:danbooru"


def shipped_table_path() -> Path:
    return Path(str(files("bigasp.text") / "data" / "danbooru" / "tag_aliases.jsonl.gz"))


def normalize_tag(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@dataclass
class AliasStats:
    rows: int = 0
    active: int = 0
    inactive: int = 0
    self_aliases: int = 0
    duplicates: int = 0
    chained: int = 0


@dataclass
class AliasTable:
    """canonical tag -> its aliases, plus the reverse map; built by `parse` / `load`."""

    canonical_of: dict[str, str]  # alias -> canonical (chains resolved)
    groups: dict[str, tuple[str, ...]]  # canonical -> sorted aliases
    stats: AliasStats = field(default_factory=AliasStats)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.canonical_of)

    def alternatives(self, tag: str) -> tuple[str, ...]:
        """Other spellings of `tag` (empty when it has none); underscores as Danbooru writes them."""
        key = normalize_tag(tag)
        canon = self.canonical_of.get(key, key)
        members = self.groups.get(canon)
        if not members:
            return ()
        return tuple(m for m in (canon, *members) if m != key)

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "<memory>") -> AliasTable:
        stats = AliasStats()
        direct: dict[str, tuple[str, int]] = {}  # antecedent -> (consequent, line number)
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            stats.rows += 1
            try:
                row = json.loads(line)
                status = row["status"]
                ante = normalize_tag(str(row["antecedent_name"]))
                cons = normalize_tag(str(row["consequent_name"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"{source}:{lineno}: not a tag-alias row ({err}); expected one JSON object per line with "
                    "antecedent_name, consequent_name and status (Danbooru tag_aliases export)"
                ) from None
            if status != "active":
                stats.inactive += 1
                continue
            stats.active += 1
            if ante == cons:
                stats.self_aliases += 1
                continue
            if ante in direct:
                prev, prev_line = direct[ante]
                if prev == cons:
                    stats.duplicates += 1
                    continue
                raise DataError(
                    f"{source}: alias {ante!r} is active for two tags: {prev!r} (line {prev_line}) and {cons!r} "
                    f"(line {lineno}); delete one of the lines"
                )
            direct[ante] = (cons, lineno)

        canonical_of: dict[str, str] = {}
        for ante, (cons, _) in direct.items():
            seen = [ante]
            while cons in direct:
                if cons in seen:
                    raise DataError(
                        f"{source}: alias cycle {' -> '.join([*seen, cons])}; remove one of its rows"
                    )
                seen.append(cons)
                cons = direct[cons][0]
            if len(seen) > 1:
                stats.chained += 1
            canonical_of[ante] = cons
        groups: dict[str, list[str]] = defaultdict(list)
        for ante, canon in canonical_of.items():
            groups[canon].append(ante)
        return cls(
            canonical_of=canonical_of,
            groups={k: tuple(sorted(v)) for k, v in groups.items()},
            stats=stats,
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> AliasTable:
        """Read a Danbooru `tag_aliases` export (JSON lines, optionally .gz), or `builtin:danbooru`."""
        if str(path) == BUILTIN_DANBOORU:
            with gzip.open(shipped_table_path(), "rt", encoding="utf-8") as f:
                return cls.parse(f, source=BUILTIN_DANBOORU)
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tag alias file {path} does not exist; set data.prompt.aliases_path to a Danbooru "
                f"tag_aliases JSON-lines export, to {BUILTIN_DANBOORU!r} for the shipped table, or leave it "
                "unset to disable alias mutation"
            )
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return cls.parse(f, source=str(path))

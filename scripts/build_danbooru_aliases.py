"""Derive the shipped Danbooru tag-alias table from the tag-autocomplete CSV, reproducibly.

Why: bigASP replaced each tag of a tag prompt, with probability 0.2, by a random Danbooru alias
(`data.py: read_tag_aliases`), so the model learns the spellings people type. bigasp ships that
table so the recipes can turn the swap on offline.

Input: `tags/danbooru.csv` of DominikDoom/a1111-sd-webui-tagcomplete at commit
4170882f90b47be130a0ff9314f663c230b9153d (MIT licence; tags and counts from Danbooru's public
API): one tag a line, `tag,category,post_count,"alias1,alias2,..."`, no header.

Rules (printed counts show what each one removed):

* aliases starting with "/" are autocomplete abbreviations ("/lh" for long_hair), not spellings
  anyone writes in a prompt: dropped;
* an alias that is itself a tag of the table names a distinct concept with its own posts
  ("pink_pillow" listed under "pillow"): dropped, since swapping it in would change the prompt's
  meaning (and it would make a chain, which bigASP's loader rejected);
* an alias listed under two or more tags is ambiguous (bigASP's loader rejected those): dropped;
* names are normalised as Danbooru stores them (strip, lowercase, spaces to underscores).

Output (deterministic bytes: sorted rows, gzip with mtime 0), in Danbooru's own `tag_aliases`
export format so `AliasTable` reads it like a Danbooru dump:
`src/bigasp/text/data/danbooru/tag_aliases.jsonl.gz`, one
`{"antecedent_name": alias, "consequent_name": tag, "status": "active"}` per line, plus the
licence next to it as `LICENSE.txt`.

Usage: python scripts/build_danbooru_aliases.py path/to/danbooru.csv [path/to/LICENSE]
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "src" / "bigasp" / "text" / "data" / "danbooru"


def normalize(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def derive(rows: list[list[str]]) -> tuple[list[tuple[str, str]], Counter]:
    """(alias, canonical) pairs, sorted, and how many candidates each rule dropped."""
    counts: Counter = Counter()
    tags = {normalize(r[0]) for r in rows}
    pairs = []
    for tag, _category, _posts, aliases in rows:
        for alias in aliases.split(","):
            alias = normalize(alias)
            if not alias:
                continue
            counts["listed"] += 1
            if alias.startswith("/"):
                counts["dropped: abbreviation"] += 1
            elif alias in tags:
                counts["dropped: is itself a tag"] += 1
            elif alias == normalize(tag):
                counts["dropped: self"] += 1
            else:
                pairs.append((alias, normalize(tag)))
    owners = Counter(alias for alias, _ in set(pairs))
    kept = sorted({(a, t) for a, t in pairs if owners[a] == 1}, key=lambda p: (p[1], p[0]))
    counts["dropped: ambiguous"] = len(set(pairs)) - len(kept)
    counts["kept"] = len(kept)
    counts["canonical tags"] = len({t for _, t in kept})
    return kept, counts


def write(pairs: list[tuple[str, str]], path: Path) -> None:
    text = "".join(
        json.dumps({"antecedent_name": a, "consequent_name": t, "status": "active"}, ensure_ascii=False)
        + "\n"
        for a, t in pairs
    )
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main(argv: list[str]) -> None:
    if not argv or len(argv) > 2:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    csv_path = Path(argv[0])
    licence = Path(argv[1]) if len(argv) > 1 else csv_path.with_suffix(".LICENSE")
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    pairs, counts = derive(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "tag_aliases.jsonl.gz"
    write(pairs, out)
    shutil.copyfile(licence, OUT / "LICENSE.txt")
    print(f"input  {csv_path}  sha256 {hashlib.sha256(csv_path.read_bytes()).hexdigest()}  {len(rows)} tags")
    for key, value in counts.items():
        print(f"  {key}: {value}")
    print(f"output {out}  sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}  {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])

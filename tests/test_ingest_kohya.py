"""kohya layouts in ingest: `.caption` sidecars, tag-list `.txt` (option + detection rule), `N_name` repeats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bigasp.prep.ingest import ingest
from bigasp.prep.kohya import folder_repeats, is_kohya_root, looks_like_tags
from bigasp.store import layout
from test_ingest import cfg, jpeg_bytes


def _rows(root: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(root / layout.MANIFEST).to_pylist()}


@pytest.mark.parametrize(
    "text",
    [
        "1girl, solo, long hair, smile",
        "outdoors, bicycle, brick wall",
        "score_9, photo (medium), depth of field, bokeh, ",
    ],
)
def test_tag_lists_are_detected(text):
    assert looks_like_tags(text)


@pytest.mark.parametrize(
    "text",
    [
        "A woman standing in a field, smiling, at sunset.",  # a sentence ends
        "a cat, a dog",  # fewer than 3 items
        "A photograph of a woman in a long red dress, standing near, the old stone bridge",  # long items
        "1girl, solo\nsmile, outdoors",  # more than one line
        "",
    ],
)
def test_captions_are_not_tags(text):
    assert not looks_like_tags(text)


def _kohya_tree(root: Path) -> Path:
    for folder, seed in (("10_cat", 1), ("3_dog", 2)):
        (root / folder).mkdir(parents=True)
        (root / folder / f"{folder}.jpg").write_bytes(jpeg_bytes(seed=seed))
    (root / "10_cat" / "10_cat.txt").write_text("1girl, solo, long hair, smile\n")
    (root / "10_cat" / "10_cat.caption").write_text("a cat on a sofa\n")
    (root / "3_dog" / "3_dog.txt").write_text("A dog running on a beach, with a ball, at noon.\n")
    (root / "3_dog" / "3_dog.json").write_text(json.dumps({"source": "my-dogs"}))
    return root


def test_kohya_folder_caption_sidecars_and_repeats(tmp_path):
    src = _kohya_tree(tmp_path / "train")
    out = tmp_path / "ds"
    ingest([src], out, cfg(txt_tags="auto"))
    rows = _rows(out)
    cat, dog = rows["10_cat.jpg"], rows["3_dog.jpg"]
    assert cat["captions"] == ["a cat on a sofa"]  # .caption read as a caption
    assert cat["tags"] == ["1girl", "solo", "long hair", "smile"]  # tag-list .txt read as tags (auto)
    assert dog["captions"] == ["A dog running on a beach, with a ball, at noon."] and dog["tags"] == []
    assert cat["source"] == "cat" and json.loads(cat["extra"]) == {"repeats": 10}
    assert dog["source"] == "my-dogs" and json.loads(dog["extra"]) == {
        "repeats": 3
    }  # a sidecar's source wins


def test_defaults_read_txt_as_caption_and_changing_settings_rereads(tmp_path):
    src = _kohya_tree(tmp_path / "train")
    out = tmp_path / "ds"
    first = ingest([src], out, cfg())
    cat = _rows(out)["10_cat.jpg"]
    assert cat["captions"] == ["1girl, solo, long hair, smile", "a cat on a sofa"] and cat["tags"] == []
    assert ingest([src], out, cfg()).skipped == first.scanned  # unchanged: nothing re-read
    again = ingest([src], out, cfg(txt_tags="tags", kohya_repeats="off"))
    assert again.skipped == 0 and again.updated == first.scanned
    cat, dog = _rows(out)["10_cat.jpg"], _rows(out)["3_dog.jpg"]
    assert cat["tags"] == ["1girl", "solo", "long hair", "smile"] and cat["source"] is None
    assert dog["tags"] == [
        "A dog running on a beach",
        "with a ball",
        "at noon.",
    ]  # forced: every .txt is tags
    assert json.loads(cat["extra"]) == {}


def test_repeats_rule(tmp_path):
    root = tmp_path / "r"
    (root / "5_photos" / "deep").mkdir(parents=True)
    (root / "2_anime").mkdir()
    assert is_kohya_root(str(root))
    o = str(root)
    assert folder_repeats(f"{o}/5_photos/deep/a.jpg", o, "auto") == ("photos", 5)
    assert folder_repeats(f"{o}/2_anime/b.jpg", o, "auto") == ("anime", 2)
    assert folder_repeats(f"{o}/top.jpg", o, "auto") is None  # not in a subfolder
    assert folder_repeats(f"{o}/2_anime/b.jpg", o, "off") is None
    assert folder_repeats(f"{o}.tar::2_anime/b.jpg", o, "on") is None  # tars and lists: no folders
    (root / "misc").mkdir()  # one folder that is not N_name: auto treats the source as not kohya's
    assert not is_kohya_root(str(root))
    assert folder_repeats(f"{o}/2_anime/b.jpg", o, "auto") is None
    assert folder_repeats(f"{o}/2_anime/b.jpg", o, "on") == ("anime", 2)
    assert folder_repeats(f"{o}/0_none/c.jpg", o, "on") is None  # kohya needs repeats >= 1


def test_cli_flags(tmp_path):
    from bigasp.cli import main

    src = _kohya_tree(tmp_path / "train")
    main(["ingest", str(src), "--out", str(tmp_path / "ds"), "--txt-tags", "auto", "--kohya-repeats", "on", "--allow-upscale",
          "--no-progress"])  # fmt: skip
    assert _rows(tmp_path / "ds")["10_cat.jpg"]["tags"] == ["1girl", "solo", "long hair", "smile"]

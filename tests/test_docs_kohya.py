"""docs/coming-from-kohya.md maps other trainers' options to bigasp config keys that exist."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from bigasp.buckets import BucketConfig
from bigasp.train.config import RunConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "coming-from-kohya.md"


def _resolve(model: type[BaseModel], dotted: str) -> bool:
    node: type[BaseModel] | None = model
    for part in dotted.split("."):
        if node is None or part not in node.model_fields:
            return False
        ann = node.model_fields[part].annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return True


def test_every_config_key_on_the_page_exists():
    text = PAGE.read_text()
    keys = set(
        re.findall(r"`((?:model|data|train|validation|checkpoint|logging|buckets)\.[a-z_.0-9]+)", text)
    )
    keys |= {"run_dir"} if "`run_dir`" in text else set()
    assert len(keys) > 40
    missing = [
        k
        for k in sorted(keys)
        if not (
            _resolve(BucketConfig, k.removeprefix("buckets."))
            if k.startswith("buckets.")
            else _resolve(RunConfig, k)
        )
    ]
    assert not missing, f"docs/coming-from-kohya.md names config keys that do not exist: {missing}"


def test_readme_links_the_page():
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "docs/coming-from-kohya.md" in readme

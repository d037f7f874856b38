"""JoyCaption prompt sets and bigASP's prompt draw (caption-images.py `get_random_prompt`).

A prompt set is data (TOML): the system message, the templates of every caption type, the
mix of types, the word-count distribution and the optional extra sentence. The draw is
bigASP's: a caption type by weight; `int(N(mean, std))` rounded up to a multiple of 10 and
clamped to [20, 170]; the "{word_count}" template of that type; the sfw sentence appended
with probability 0.25. Every draw takes an explicit generator, so prompts are reproducible.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bigasp.errors import ConfigError

BUILTIN = ("alpha-two", "beta-one")


@dataclass(frozen=True)
class PromptSet:
    name: str
    system: str
    types: dict[str, list[str]]
    mix: dict[str, float]
    template: int
    word_mean: float
    word_std: float
    round_to: int
    word_min: int
    word_max: int
    extra: str
    extra_probability: float

    def word_count(self, rng: np.random.Generator) -> int:
        n = int(rng.normal(self.word_mean, self.word_std))  # int() truncates toward zero, as bigASP
        n = self.round_to * ((n + self.round_to - 1) // self.round_to)
        return min(max(n, self.word_min), self.word_max)

    def draw(self, rng: np.random.Generator) -> tuple[str, str]:
        """-> (caption type, prompt)."""
        names = list(self.mix)
        w = np.asarray([self.mix[k] for k in names], np.float64)
        caption_type = names[int(rng.choice(len(names), p=w / w.sum()))]
        words = self.word_count(rng)
        prompt = self.types[caption_type][self.template]
        if rng.random() < self.extra_probability:
            prompt += self.extra
        return caption_type, prompt.format(word_count=words, length="")


def load_prompt_set(spec: str) -> PromptSet:
    """A built-in set by name, or a TOML file in the same form."""
    if spec in BUILTIN:
        text = resources.files("bigasp.annotate").joinpath(f"prompts/{spec}.toml").read_text(encoding="utf-8")
        where = f"built-in prompt set {spec}"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"caption.prompt_set = {spec!r} is neither a built-in set ({', '.join(BUILTIN)}) nor a TOML file"
            )
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        d = tomllib.loads(text)
        wc = d["word_count"]
        ps = PromptSet(
            name=str(d.get("name", spec)),
            system=str(d["system"]),
            types={k: list(v) for k, v in d["types"].items()},
            mix={k: float(v) for k, v in d["mix"].items()},
            template=int(d.get("template", 1)),
            word_mean=float(wc["mean"]),
            word_std=float(wc["std"]),
            round_to=int(wc.get("round_to", 10)),
            word_min=int(wc["min"]),
            word_max=int(wc["max"]),
            extra=str(d.get("extra", "")),
            extra_probability=float(d.get("extra_probability", 0.0)),
        )
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{where}: not a valid prompt set ({type(err).__name__}: {err})") from None
    for k in ps.mix:
        if k not in ps.types or len(ps.types[k]) <= ps.template:
            raise ConfigError(
                f"{where}: [mix] names {k!r}, which has no template number {ps.template} in [types]"
            )
    return ps

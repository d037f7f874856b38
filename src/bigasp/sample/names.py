"""Sampler and scheduler names as ComfyUI and A1111/Forge users type them.

bigasp's names are ComfyUI's (`dpmpp_2m_sde`, `karras`). A1111 shows the same samplers as
`DPM++ 2M SDE` and the schedules as `Karras` (its "Schedule type"), and people type either in
any case. `normalize_sampler`/`normalize_scheduler` map all of those to the one name bigasp
uses, and refuse, saying why, names of samplers bigasp does not have (the ancestral ones) or
A1111's older combined names (`DPM++ 2M Karras` = a sampler plus a schedule).
"""

from __future__ import annotations

import re

SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
SCHEDULERS = ("normal", "simple", "sgm_uniform", "beta", "karras", "exponential")

# A1111/Forge display names (also what bigasp writes into a PNG's `parameters`).
SAMPLER_DISPLAY = {
    "euler": "Euler",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
}
SCHEDULER_DISPLAY = {
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "beta": "Beta",
    "karras": "Karras",
    "exponential": "Exponential",
}


def _key(name: str) -> str:
    """'DPM++ 2M SDE' -> 'dpmpp_2m_sde'; 'k_euler' -> 'euler'; 'SGM-Uniform' -> 'sgm_uniform'."""
    key = name.strip().lower().replace("++", "pp")
    key = re.sub(r"[\s\-./]+", "_", key).strip("_")
    return key.removeprefix("k_")


def normalize_sampler(name: str) -> str:
    """The bigasp (ComfyUI) sampler name for `name` as ComfyUI or A1111 spell it; ValueError
    naming the choices for one bigasp does not have."""
    key = _key(name)
    if key in SAMPLERS:
        return key
    choices = ", ".join(f"{c} ({SAMPLER_DISPLAY[c]})" for c in SAMPLERS)
    # A1111 before 1.9 named sampler+schedule together ('DPM++ 2M Karras', alias k_dpmpp_2m_ka).
    for suffix, schedule in (*((s, s) for s in SCHEDULERS), ("ka", "karras"), ("exp", "exponential")):
        base = key.removesuffix(f"_{suffix}")
        if base != key and base in SAMPLERS:
            raise ValueError(
                f"{name!r} is A1111's older combined name of a sampler and a schedule: "
                f"use sampler {base} with scheduler {schedule}"
            )
    if key.endswith("_a") or "ancestral" in key:
        raise ValueError(
            f"{name!r} is an ancestral sampler, which bigasp does not have; choose one of {choices}"
        )
    if key.endswith("_gpu") and key.removesuffix("_gpu") in SAMPLERS:
        raise ValueError(
            f"{name!r} draws its SDE noise on the GPU (ComfyUI's _gpu variant), which bigasp does not "
            f"reproduce; use {key.removesuffix('_gpu')} (ComfyUI's CPU Brownian-tree noise)"
        )
    raise ValueError(f"unknown sampler {name!r}; choose one of {choices}")


def normalize_scheduler(name: str) -> str:
    """The bigasp (ComfyUI) scheduler name for `name` as ComfyUI or A1111 spell it."""
    key = _key(name)
    if key in SCHEDULERS:
        return key
    choices = ", ".join(f"{c} ({SCHEDULER_DISPLAY[c]})" for c in SCHEDULERS)
    if key == "automatic":
        raise ValueError(f"scheduler 'Automatic' is A1111's per-sampler default; name one of {choices}")
    raise ValueError(f"unknown scheduler {name!r}; choose one of {choices}")

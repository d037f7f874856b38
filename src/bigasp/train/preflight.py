"""Checks at train start that the dataset can train this model, before any step runs.

A dataset that was ingested but never encoded, or encoded with another VAE (latents in another
space, or scaled by another factor), would otherwise fail later with a confusing message or,
worse, train without error on latents the model cannot decode.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bigasp.errors import DataError

log = logging.getLogger(__name__)


def check_has_latents(dataset) -> None:
    """A dataset with images but no latents needs `bigasp encode` first."""
    if len(dataset) > 0:
        return
    root = getattr(dataset, "root_url", "the dataset")
    n = getattr(dataset, "n_images", 0)
    if n:
        raise DataError(
            f"{root} has {n} ingested image(s) but no latents yet: run `bigasp encode {root} --vae <the model's "
            "VAE>` before training"
        )
    raise DataError(f"{root} holds no images: run `bigasp ingest` and `bigasp encode` first")


def check_complete(dataset, cfg) -> None:
    """Every ingested image has a latent (or was rejected by encode): an unfinished encode or a
    shard whose index file is lost would otherwise train on a fraction of the data without a word.
    `data.allow_partial = true` trains on what is there; a streaming run is partial by design and
    is not checked here (it waits for the encoder)."""
    if not hasattr(dataset, "unencoded_images"):
        return  # a wrapped or in-memory dataset (tests): nothing ingested to compare with
    missing = dataset.unencoded_images()
    unindexed = dataset.unindexed_shards()
    if not missing and not unindexed:
        return
    root = dataset.root_url
    found = []
    if missing:
        found.append(f"{missing} of {dataset.n_images} ingested images in {root} have no latent")
    if unindexed:
        found.append(f"{len(unindexed)} shard(s) of {root} have no index file (e.g. {unindexed[0]})")
    message = (
        "; ".join(found) + f": run `bigasp encode {root}` to finish (it also rebuilds a lost index from the "
        "shard's footer)"
    )
    if getattr(cfg.data, "allow_partial", False):
        log.warning("%s (data.allow_partial = true: training on the %d that have one)", message, len(dataset))
        return
    raise DataError(
        f"{message}; or set data.allow_partial = true to train on the {len(dataset)} that have one"
    )


REMOTE_HEADER_SAMPLE = 64  # shard headers read on object storage (one request each)


def check_dataset(dataset, model, cfg, shards: list[str] | None = None) -> None:
    """The dataset has latents, all of one encoding, made by this model's VAE at its scaling (each
    dataset of a `MultiDataset`). `shards`: check only these (a streaming run checks each wave's
    new shards)."""
    members = getattr(dataset, "members", None)
    if members is not None:
        for member in members:
            check_dataset(member, model, cfg)
        return
    if shards is None:
        check_has_latents(dataset)
        check_complete(dataset, cfg)
    if not hasattr(dataset, "shard_headers"):
        return  # a wrapped or in-memory dataset (tests): nothing recorded to compare
    from bigasp.store.shard import ENCODING_KEYS, describe_encoding, encoding_of

    limit = None if getattr(dataset, "_local", True) else REMOTE_HEADER_SAMPLE
    found: dict[tuple, list[str]] = {}
    for name, header in dataset.shard_headers(limit, names=shards).items():
        enc = encoding_of(header)
        found.setdefault(tuple(enc[k] for k in ENCODING_KEYS), []).append(name)
    if len(found) > 1:
        kinds = "; ".join(
            f"{describe_encoding(dict(zip(ENCODING_KEYS, k, strict=True)))} in {len(v)} shard(s)"
            for k, v in found.items()
        )
        raise DataError(
            f"{dataset.root_url} mixes latents of different encodings ({kinds}); `bigasp dataset verify` lists "
            "them: delete the unwanted shards (and their latents/index files) and re-run `bigasp encode`"
        )
    ((vae_id, scaling, _seed, _latent),) = found.keys()
    vae = getattr(model, "vae", None)
    model_scaling = _model_scaling(model, cfg)
    if (
        scaling is not None
        and model_scaling is not None
        and abs(float(scaling) - model_scaling) > 1e-6 * model_scaling
    ):
        raise DataError(
            f"{dataset.root_url} latents were scaled by {scaling} but the model's VAE ({cfg.model.source}) uses "
            f"scaling_factor {model_scaling}: the model would learn latents it cannot decode. Re-encode the dataset "
            "with the model's VAE (bigasp encode --vae <model>) or train a model whose VAE matches"
        )
    if vae is None or vae_id is None or _is_preset(cfg.model.source):
        log.info(
            "dataset %s: VAE identity not compared (not recorded, or the model is a random preset)",
            dataset.root_url,
        )
        return
    from bigasp.models.identity import vae_identity

    mine = vae_identity(vae)
    if mine == vae_id:
        return
    message = (
        f"{dataset.root_url} was encoded with VAE {vae_id} but the model's VAE ({cfg.model.source}) is {mine}: "
        "latents from another VAE train a model that decodes them wrongly. Re-encode with the model's VAE "
        "(bigasp encode --vae <model>), or set data.check_vae = false if the VAE is a compatible variant "
        "(e.g. the SDXL fp16-fix VAE)"
    )
    if getattr(cfg.data, "check_vae", True):
        raise DataError(message)
    log.warning("%s (data.check_vae = false: training anyway)", message)


def _is_preset(source: str) -> bool:
    from bigasp.models.presets import PRESETS

    return source in PRESETS


def _model_scaling(model, cfg) -> float | None:
    """The scaling factor the model's VAE decodes with: from the loaded VAE, else its config file."""
    vae = getattr(model, "vae", None)
    if vae is not None:
        return float(vae.config.scaling_factor)
    import json
    from pathlib import Path

    if _is_preset(cfg.model.source):
        from bigasp.models.presets import component_config

        return float(component_config(cfg.model.source, "vae").get("scaling_factor", 0.13025))
    path = Path(str(cfg.model.source)) / "vae" / "config.json"
    try:
        return float(json.loads(path.read_text())["scaling_factor"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_sources(cfg, *, resume: str | None = None) -> None:
    """`data.dataset` opens as a dataset and `model.source` exists, checked before any model
    loads (minutes for SDXL) and reported under the config key to fix."""
    from bigasp.errors import BigaspError, ConfigError
    from bigasp.models.io import describe_missing
    from bigasp.models.presets import PRESETS
    from bigasp.store import layout
    from bigasp.store.manifest import read_dataset_json
    from bigasp.train.datasets import dataset_specs

    for spec in dataset_specs(cfg.data):  # every dataset of a list, with its own fsspec options
        try:
            fs, root = layout.url_to_fs(spec.url, spec.storage_options)
            read_dataset_json(fs, root)
        except (BigaspError, OSError, ValueError) as err:
            raise ConfigError(f"{spec.key} = {spec.url!r}: {err}") from None
    source = str(cfg.model.source)
    if resume is None and source not in PRESETS and not Path(source).expanduser().exists():
        raise ConfigError(f"model.source = {source!r}: {describe_missing(source)}")

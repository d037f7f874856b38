"""Assembling and running the arena for `bigasp quality arena`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bigasp.errors import DataError
from bigasp.quality.arena import Arena, HostPolicy, create_app, make_server
from bigasp.quality.config import ArenaConfig
from bigasp.quality.pool import PairPicker, load_pool
from bigasp.quality.ratings import RatingStore


def build_arena(
    dataset: str | Path, cfg: ArenaConfig, *, ratings: str | Path | None = None, classifier: Path | None = None,
    flagged: Path | None = None, embed_key: str | None = None, token: str | None = None,
) -> Arena:  # fmt: skip
    from bigasp.quality.pipeline import Paths
    from bigasp.store.annotations import list_models, read_embeddings

    dataset = Path(dataset)
    paths = Paths(dataset)
    store = RatingStore(ratings or paths.ratings)
    emb = read_embeddings(dataset, embed_key) if list_models(dataset, "embed") else None
    pool = load_pool(dataset, store, cfg.pool, cfg.seed, set(emb.ids) if emb is not None else None)
    ids = [p.id for p in pool]
    judge = None
    classifier = classifier or (paths.classifier if paths.classifier.is_file() else None)
    if classifier is not None:
        if emb is None:
            raise DataError(
                f"{dataset}: a classifier needs the dataset's embeddings; run `bigasp annotate` first"
            )
        from bigasp.quality.models import check_embedding_size, load_model
        from bigasp.quality.pairwise import judge_fn

        model, _ = load_model(classifier, "quality-classifier")
        check_embedding_size(model, classifier, emb.vectors, emb.model_key)
        # lenient: one image's NaN embedding must not break every page load (the picker and the
        # prediction leave a non-finite probability aside)
        judge = judge_fn(model, emb.lookup(ids), source=str(classifier), strict=False)
    flags = None
    if flagged is not None:
        if not Path(flagged).is_file():
            raise DataError(
                f"--flagged {flagged} does not exist; give a text file of image ids, one per line"
            )
        wanted = {line.strip() for line in Path(flagged).read_text().splitlines() if line.strip()}
        flags = np.array([i in wanted for i in ids], bool)
    picker = PairPicker(len(pool), store, ids, seed=cfg.seed, judge=judge, flagged=flags,
                        candidates=cfg.uncertain_candidates, flagged_confidence=cfg.flagged_confidence)  # fmt: skip
    return Arena(pool, store, picker, judge=judge, token=token, max_side=cfg.max_side)


def run_server(
    arena: Arena,
    *,
    host: str,
    port: int,
    threads: int,
    echo: Callable[[str], None],
    allow_hosts: tuple[str, ...] = (),
) -> None:
    """Serve until Ctrl-C; the app answers only to loopback names, `host` and `allow_hosts`."""
    arena.hosts = HostPolicy(host, tuple(allow_hosts))
    server = make_server(create_app(arena), host, port, threads, token=arena.token is not None)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    suffix = "/?token=<your token>" if arena.token else "/"
    echo(f"arena: {len(arena.pool)} images in the pool, ratings in {arena.store.path}")
    echo(f"arena: open http://{shown}:{server.effective_port}{suffix} (Ctrl-C to stop)")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()

"""`bigasp annotate`: CLIP embeddings, tags, watermark flags and captions for a dataset.

One pass decodes each image once and feeds every enabled image model (embed, tags,
watermark); captioning runs as its own pass. Work is rank-sharded (torchrun / SLURM),
results are append-only Parquet parts (`bigasp.store.annotations`), so a killed run resumes
without redoing or duplicating work, and `bigasp annotate merge` brings the results into
the manifest. See docs/annotate.md.
"""

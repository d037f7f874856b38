"""Quality scores 0–9 the bigASP way: human pairwise ratings -> pairwise classifier -> ELO
tournament -> equal-width bins -> score classifier -> `score` for every image.

Modules: `ratings` (SQLite store), `arena` (rating web app), `pool` (which pairs to show),
`models` (the two MLPs), `pairwise` / `scorer` (training), `elo` / `bradley_terry`
(ranking), `scoring` (writing scores), `embed` (CLIP embeddings of degraded copies),
`study` (synthetic world with known quality). The procedure is in docs/quality.md.
"""

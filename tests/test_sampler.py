"""Epoch planner: homogeneous batches, coverage, drops, determinism, dealing, resume positions."""

from __future__ import annotations

import numpy as np
import pytest

from bigasp.train.sampler import (
    SamplerState,
    build_row_buckets,
    chunk_estimates,
    eval_plan,
    plan_epoch,
    plan_for_rank,
    resume_position,
)


def make_buckets(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.array([[1216, 832], [832, 1216], [1024, 1024], [640, 1536]])
    pick = rng.choice(4, n, p=[0.45, 0.45, 0.095, 0.005])
    tokens = rng.integers(0, 260, n)
    chunks = chunk_estimates(tokens, 5.0)
    rows = np.sort(rng.choice(5 * n, n, replace=False))  # arbitrary row ids (e.g. the train split)
    return build_row_buckets(rows, sizes[pick, 0], sizes[pick, 1], chunks), sizes[pick], chunks, rows


def test_chunk_estimates_match_bigasp_rule():
    # bigASP: clamp(ceil((n_tokens + 5) / 75), 1, 3)
    t = np.array([0, 69, 70, 71, 145, 146, 500])
    assert chunk_estimates(t, 5.0).tolist() == [1, 1, 1, 2, 2, 3, 3]
    assert chunk_estimates(t, 5.0, max_chunks=2).tolist() == [1, 1, 1, 2, 2, 2, 2]


def test_buckets_group_by_resolution_and_chunks():
    b, hw, chunks, rows = make_buckets()
    assert b.counts.sum() == len(rows)
    for k in range(b.n_buckets):
        members = b.keys == k
        assert (hw[members] == b.bucket_hw[k]).all()
        assert (chunks[members] == b.bucket_chunks[k]).all()
    assert b.describe(int(b.keys[0])).count("x") == 1


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_plan_is_homogeneous_disjoint_and_accounts_for_every_row(batch):
    b, hw, chunks, rows = make_buckets()
    plan = plan_epoch(b, seed=3, epoch=0, device_batch_size=batch)
    pos_of = {int(r): i for i, r in enumerate(rows)}
    seen = []
    for i in range(plan.n_batches):
        r = plan.batch_rows(i)
        assert len(r) == batch
        idx = [pos_of[int(x)] for x in r]
        assert len({tuple(hw[j]) for j in idx}) == 1
        assert len({int(chunks[j]) for j in idx}) == 1
        assert {int(b.keys[j]) for j in idx} == {int(plan.batch_bucket[i])}
        seen.extend(r.tolist())
    assert len(seen) == len(set(seen))
    assert len(seen) + plan.leftover_samples == len(rows)
    assert plan.leftover_samples == int((b.counts % batch).sum())
    assert set(plan.tiny_buckets) == {k for k in range(b.n_buckets) if 0 < b.counts[k] < batch}


def test_plan_is_deterministic_and_differs_per_epoch_and_seed():
    b, *_ = make_buckets()
    p1 = plan_epoch(b, seed=3, epoch=2, device_batch_size=4)
    p2 = plan_epoch(b, seed=3, epoch=2, device_batch_size=4)
    assert np.array_equal(p1.order, p2.order) and np.array_equal(p1.batch_starts, p2.batch_starts)
    rows = lambda p: np.concatenate([p.batch_rows(i) for i in range(p.n_batches)])  # noqa: E731
    other_epoch = plan_epoch(b, seed=3, epoch=3, device_batch_size=4)
    other_seed = plan_epoch(b, seed=4, epoch=2, device_batch_size=4)
    assert not np.array_equal(rows(p1), rows(other_epoch))
    assert not np.array_equal(rows(p1), rows(other_seed))
    # batches are shuffled across buckets, not emitted bucket by bucket
    assert (np.diff(p1.batch_bucket.astype(int)) != 0).sum() > p1.n_batches // 3


def test_leftovers_differ_between_epochs_so_no_image_is_starved():
    b, *_ = make_buckets(n=300)
    dropped = []
    for e in range(6):
        plan = plan_epoch(b, seed=1, epoch=e, device_batch_size=8)
        used = np.concatenate([plan.batch_rows(i) for i in range(plan.n_batches)])
        dropped.append(set(b.rows.tolist()) - set(used.tolist()))
    assert len(set.union(*dropped)) > len(dropped[0])
    big = [k for k in range(b.n_buckets) if b.counts[k] >= 8]
    always = set.intersection(*dropped) & set(b.rows[np.isin(b.keys, big)].tolist())
    assert not always


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dealing_covers_the_batch_list_once_and_tail_is_dropped(world):
    b, *_ = make_buckets()
    plan = plan_epoch(b, seed=0, epoch=0, device_batch_size=4)
    got = np.sort(np.concatenate([plan.rank_positions(0, r, world) for r in range(world)]))
    usable = plan.n_batches - plan.tail_dropped(0, world)
    assert np.array_equal(got, np.arange(usable))
    assert plan.tail_dropped(0, world) == plan.n_batches % world
    # from a mid-epoch position, rank r continues with position + r, + r + world, ...
    mid = 10
    for r in range(world):
        pos = plan.rank_positions(mid, r, world)
        assert pos[0] == mid + r and (np.diff(pos) == world).all()
        assert len(pos) == (plan.n_batches - mid) // world


def test_world_size_does_not_change_the_batch_sequence():
    b, *_ = make_buckets()
    plan = plan_epoch(b, seed=5, epoch=1, device_batch_size=4)
    # two ranks interleaved == one rank's sequence
    two = np.stack([plan.rank_positions(0, r, 2) for r in range(2)], axis=1).reshape(-1)
    assert np.array_equal(two, plan.rank_positions(0, 0, 1)[: len(two)])


def test_resume_position_counts_batches_and_converts_samples():
    st = SamplerState(epoch=3, position=12, device_batch_size=4, world_size=2, seed=1, n_rows=100)
    assert SamplerState.from_dict(st.to_dict()) == st
    assert st.to_dict()["samples_in_epoch"] == 48
    assert resume_position(st, 4) == 12  # same batch size: exact, any world size
    assert resume_position(st, 1) == 48  # bigASP's bug would have skipped to 12 here
    assert resume_position(st, 8) == 6
    assert resume_position(st, 5) == 9  # floor(48 / 5)


def test_eval_plan_uses_every_row_once_homogeneously():
    b, _, _, rows = make_buckets(n=203)
    batches = eval_plan(b, device_batch_size=8)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.sort(rows))
    key = dict(zip(b.rows.tolist(), b.keys.tolist(), strict=True))
    for r in batches:
        assert 1 <= len(r) <= 8 and len({key[int(x)] for x in r}) == 1
    assert [x.tolist() for x in batches] == [x.tolist() for x in eval_plan(b, device_batch_size=8)]


def test_plan_handles_large_arrays_quickly_and_compactly():
    # 200k rows: a correctness smoke test of the vectorised path (scale is measured by a script)
    rng = np.random.default_rng(0)
    n = 200_000
    b = build_row_buckets(
        np.arange(n), rng.integers(8, 12, n) * 64, rng.integers(8, 12, n) * 64, rng.integers(1, 4, n)
    )
    plan = plan_epoch(b, seed=0, epoch=0, device_batch_size=16)
    assert plan.order.dtype == np.int64 and plan.batch_starts.dtype == np.int64
    assert plan.n_batches * 16 + plan.leftover_samples == n
    assert len(np.unique(plan.order)) == n


def test_fast_and_generic_bucket_paths_agree():
    # multiples of 8 take the O(N) dense path; other sizes the np.unique path: same buckets
    rng = np.random.default_rng(1)
    n = 5000
    h, w, c = rng.choice([64, 832, 1216, 1728], n), rng.choice([576, 832, 1024], n), rng.integers(1, 4, n)
    fast = build_row_buckets(np.arange(n), h, w, c)
    slow = build_row_buckets(np.arange(n), h + 1, w, c)
    assert np.array_equal(fast.keys, slow.keys)
    assert np.array_equal(fast.bucket_hw, slow.bucket_hw - [1, 0])
    assert np.array_equal(fast.bucket_chunks, slow.bucket_chunks)
    assert np.array_equal(fast.counts, slow.counts)


def test_plan_for_rank_matches_the_pieces():
    rng = np.random.default_rng(2)
    n = 3000
    h, w = rng.choice([832, 1216], n), rng.choice([832, 1216], n)
    tokens = rng.integers(0, 250, n)
    buckets, plan, mine = plan_for_rank(
        h, w, tokens, seed=9, epoch=4, device_batch_size=8, world_size=4, rank=3
    )
    ref = build_row_buckets(np.arange(n), h, w, chunk_estimates(tokens, 8.25))
    assert np.array_equal(buckets.keys, ref.keys)
    same = plan_epoch(ref, seed=9, epoch=4, device_batch_size=8)
    assert np.array_equal(plan.order, same.order) and np.array_equal(mine, same.rank_positions(0, 3, 4))

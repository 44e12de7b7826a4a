"""A NaN in the inputs reaches every row that reads it, and no other: never another batch
element, another head (other than the query heads of its kv head), or another segment.

Inside a segment a NaN key or value can also reach rows that do not attend to it (a causally
masked weight is 0 and ``0 * NaN = NaN``); the README's API section documents both."""

from __future__ import annotations

import numpy as np
import pytest

B, N, H, H_KV, D = 2, 32, 4, 2, 8
W, R = (8, 16), (1, 2)
P, KVH = 21, 1  # the poisoned position and kv head (batch 0); kv head 1 is read by heads 2, 3
READERS = range(KVH * (H // H_KV), (KVH + 1) * (H // H_KV))


def _patterns_of_head(mix: str, head: int) -> list[int]:
    if mix == "longnet":
        return list(range(len(W)))
    sizes = [H // len(W) + (i < H % len(W)) for i in range(len(W))]
    return [int(np.searchsorted(np.cumsum(sizes), head, side="right"))]


def _may_be_nan(mix: str, which: str) -> np.ndarray:
    """``[B, N, H]``: where a NaN at (0, P, KVH) may appear: batch 0; for q the query's own row
    and heads, for k/v the heads reading KVH; rows of a segment containing P."""
    allowed = np.zeros((B, N, H), bool)
    heads = READERS if which != "query" else [KVH]
    for j in heads:
        for i in _patterns_of_head(mix, j):
            start = P // W[i] * W[i]
            rows = [P] if which == "query" else range(start, start + W[i])
            allowed[0, list(rows), j] = True
    return allowed


def _inputs(which: str):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, N, h, D)) for h in (H, H_KV, H_KV))
    x = {"query": q, "key": k, "value": v}[which]
    x[0, P, KVH] = np.nan
    return q, k, v


def _run(framework: str, q, k, v, **kw):
    if framework == "jax":
        jnp = pytest.importorskip("jax.numpy")
        import ring_jax

        return np.asarray(ring_jax.dilated_attention(*(jnp.asarray(x) for x in (q, k, v)), **kw))
    torch = pytest.importorskip("torch")
    import ring_torch

    fn = ring_torch.ring_dilated_attention if "ring_size" in kw else ring_torch.dilated_attention
    return fn(*(torch.from_numpy(x) for x in (q, k, v)), **kw).numpy()


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 4])
def test_nan_stays_in_its_batch_heads_and_segments(framework, which, mix, causal, ring_size):
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=causal)
    if ring_size:
        kw["ring_size"] = ring_size
    out = _run(framework, *_inputs(which), **kw)
    nan_rows = np.isnan(out).any(-1)  # [B, N, H]
    allowed = _may_be_nan(mix, which)
    assert not (nan_rows & ~allowed).any(), np.argwhere(nan_rows & ~allowed)[:5]
    # It does reach the rows that read it: the poisoned position's own row (in head KVH of the
    # query; for k/v in a reading head whose pattern selects P, e.g. head 3: (21 % 16) % 2 == 3 % 2).
    assert nan_rows[0, P, KVH if which == "query" else 3]
    assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_causal_nan_effect_is_the_same_in_both_frameworks(mix):
    """Causal: a NaN key never reaches earlier rows (its score is masked), a NaN value reaches
    earlier rows of its segment that read its selected rows (their weight on it is 0, 0 * NaN),
    in both frameworks alike."""
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    key_nan = np.isnan(_run("torch", *_inputs("key"), **kw)).any(-1)
    assert not key_nan[:, :P].any()
    value_nan = {fw: np.isnan(_run(fw, *_inputs("value"), **kw)).any(-1) for fw in ("jax", "torch")}
    np.testing.assert_array_equal(value_nan["jax"], value_nan["torch"])
    assert value_nan["torch"][0, :P].any()

"""``dilated_attention(chunk_size=...)``: same values and gradients as one pass, bounded memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ring_jax
from parity_tests.frameworks import max_abs_err

W, R = (8, 16, 32), (1, 2, 4)


def _qkv(b=2, n=128, h=6, h_kv=3, d=16, dtype=jnp.float64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (b, n, h, d), dtype), jax.random.normal(k2, (b, n, h_kv, d), dtype),
            jax.random.normal(k3, (b, n, h_kv, d), dtype))


def _values_and_grads(q, k, v, **kw):
    """out, lse and the gradients of a loss that uses both (so the LSE cotangent is non-zero)."""
    def loss(q, k, v):
        out, lse = ring_jax.dilated_attention(q, k, v, return_lse=True, **kw)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))

    out, lse = ring_jax.dilated_attention(q, k, v, return_lse=True, **kw)
    return (out, lse, *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk", [32, 64])
def test_chunks_match_one_pass_float64(mix, is_causal, chunk):
    q, k, v = _qkv()
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=is_causal)
    whole = _values_and_grads(q, k, v, **kw)
    chunked = _values_and_grads(q, k, v, chunk_size=chunk, **kw)
    for a, b in zip(chunked, whole):
        assert max_abs_err(a, b) <= 1e-12


def test_chunks_keep_the_dropout_mask_global():
    q, k, v = _qkv(n=64)
    kw = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), mix="longnet", dropout_rate=0.3, dropout_seed=7)
    whole = _values_and_grads(q, k, v, **kw)
    chunked = _values_and_grads(q, k, v, chunk_size=32, **kw)
    for a, b in zip(chunked, whole):
        assert max_abs_err(a, b) <= 1e-12
    # and the mask does depend on the position: a shifted input does not give shifted outputs
    shifted = ring_jax.dilated_attention(*(jnp.roll(x, 32, axis=1) for x in (q, k, v)), **kw)
    assert max_abs_err(jnp.roll(shifted, -32, axis=1), whole[0]) > 1e-3


def test_output_only_gradient_matches_with_and_without_chunks():
    # return_lse=False: the backward runs with no LSE cotangent at all (dlse=None path)
    q, k, v = _qkv()
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=True)

    def grads(**extra):
        return jax.grad(lambda q, k, v: jnp.sum(jnp.tanh(ring_jax.dilated_attention(q, k, v, **kw, **extra))),
                        argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(chunk_size=32), grads()):
        assert max_abs_err(a, b) <= 1e-12


def test_chunked_jit_memory_is_flat_in_n():
    # Forward+backward temporaries of the compiled program: with chunks (and the out/lse recomputed
    # in the backward) they are one chunk's, whatever n; in one pass they grow with n.
    def temp_bytes(n, chunk):
        x = jax.ShapeDtypeStruct((1, n, 4, 32), jnp.float32)
        f = jax.jit(jax.grad(lambda q, k, v: ring_jax.dilated_attention(
            q, k, v, segment_lengths=(64, 128), dilation_rates=(1, 2), mix="longnet", chunk_size=chunk).sum(),
            argnums=(0, 1, 2)))
        return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    chunked = [temp_bytes(n, 128) for n in (1024, 4096)]
    assert chunked[1] <= 1.05 * chunked[0], chunked
    assert temp_bytes(4096, None) > 4 * chunked[1]


@pytest.mark.parametrize("chunk, message", [
    (48, "chunk_size=48 is not a multiple of the segment length w=32 (seq_len=192)"),  # padded to 192
    (16, "chunk_size=16 is not a multiple of the segment length w=32"),
    (0, "chunk_size=0 must be a positive int"),
    (32.0, "chunk_size=32.0 must be a positive int"),
])
def test_chunk_errors_name_the_values(chunk, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ring_jax.dilated_attention(q, k, v, segment_lengths=W, dilation_rates=R, chunk_size=chunk)


def test_chunks_and_ring_size_are_exclusive():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="chunk_size=32 and ring_size=2"):
        ring_jax.dilated_attention(q, k, v, segment_lengths=W, dilation_rates=R, chunk_size=32, ring_size=2)


def test_segment_longer_than_sequence_cannot_be_chunked():
    q, k, v = _qkv(n=64)
    with pytest.raises(ValueError, match="not a multiple of the segment length w=64"):
        ring_jax.dilated_attention(q, k, v, segment_lengths=(16, 256), dilation_rates=(1, 4), chunk_size=32)
    out = ring_jax.dilated_attention(q, k, v, segment_lengths=(16, 256), dilation_rates=(1, 4), chunk_size=64)
    np.testing.assert_allclose(out, ring_jax.dilated_attention(q, k, v, segment_lengths=(16, 256),
                                                               dilation_rates=(1, 4)), atol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
def test_backward_gets_no_lse_cotangent_unless_the_lse_is_returned(return_lse, monkeypatch):
    # With out only, every unit's block backward is called with dlse=None, which lets the cuDNN
    # kernel run at head_dim (no extra LSE column); a returned LSE brings its cotangent along.
    from ring_jax._kernels import BlockSpec

    seen = []
    real = BlockSpec.backward
    monkeypatch.setattr(BlockSpec, "backward", lambda self, *a: seen.append(a[6] is None) or real(self, *a))
    q, k, v = _qkv(n=64)

    def loss(q):
        res = ring_jax.dilated_attention(q, k, v, segment_lengths=(16, 32), dilation_rates=(1, 2), mix="longnet",
                                         return_lse=return_lse)
        return jnp.sum(res[0] + res[1][..., None]) if return_lse else jnp.sum(res)

    jax.grad(loss)(q)
    assert seen and all(s == (not return_lse) for s in seen)


def test_keeps_rows_only_for_one_pass_one_layer_when_not_larger():
    from ring_jax._api import one_device_mode
    from ring_jax._chunked import chunked_attention
    from ring_jax._dilated import kept_rows_attention, keeps_rows, saved_attention
    from ring_jax._plan import get_plan

    def plan(mix, h=8, h_kv=8, n=128, w=(8, 16, 32, 64), r=(1, 2, 4, 8)):
        return get_plan(ring_jax.DilatedConfig(w, r, mix, True), n, h, h_kv)

    assert keeps_rows(plan("head_groups"))
    assert not keeps_rows(plan("longnet"))  # merged rows differ from each unit's
    assert keeps_rows(plan("head_groups", h_kv=1))  # kv rows repeated, still smaller
    assert not keeps_rows(plan("head_groups", h_kv=1, r=(1, 1, 1, 1)))  # repeats outweigh
    assert one_device_mode(plan("head_groups"), 128) is kept_rows_attention
    assert one_device_mode(plan("head_groups"), 256) is chunked_attention  # the plan of one chunk
    assert one_device_mode(plan("longnet"), 128) is saved_attention


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_kept_rows_give_the_gathered_backward_and_skip_its_gathers(dropout, monkeypatch):
    """head_groups one pass: the backward reuses the forward's rows (one gather per unit for the
    cotangent, one more for the LSE cotangent) and equals the backward that gathers again."""
    import ring_jax._api as api
    import ring_jax._dilated as dilated
    import ring_jax._rows as rows

    q, k, v = _qkv()
    kw = dict(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True,
              dropout_rate=dropout, dropout_seed=3)
    calls = []
    real = rows.gather_rows
    api._jitted.cache_clear()  # an eager call is traced afresh, not fetched from another test's jit
    jax.clear_caches()
    for module in (rows, dilated):
        monkeypatch.setattr(module, "gather_rows", lambda *a: calls.append(1) or real(*a))
    kept = _values_and_grads(q, k, v, **kw)
    kept_calls = len(calls)
    monkeypatch.setattr(api, "keeps_rows", lambda plan: False)
    api._jitted.cache_clear()
    calls.clear()
    gathered = _values_and_grads(q, k, v, **kw)
    units = len(W)
    # per unit: forward q, k, v (traced twice: the values call and the grad call); backward dout,
    # dlse, and the three traced for the transposes that scatter dq, dk, dv back
    assert kept_calls == units * (3 + 3 + 2 + 3)
    assert len(calls) == units * (3 + 3 + 5 + 2 + 3)  # backward also re-gathers q, k, v, out, lse
    for a, b in zip(kept, gathered):
        assert max_abs_err(a, b) <= 1e-12


def test_tiled_heads_assemble_gradients_like_the_output(monkeypatch):
    """head_groups without shared kv heads: gradients concatenated per unit in the input dtype,
    equal to the float32 scatter-add sums (the general path)."""
    import ring_jax._dilated as dilated
    from ring_jax._plan import get_plan

    def plan(mix, h=6, h_kv=6):
        return get_plan(ring_jax.DilatedConfig(W, R, mix, True), 128, h, h_kv)

    assert dilated.tiles_heads(plan("head_groups"))
    assert not dilated.tiles_heads(plan("head_groups", h_kv=3))  # kv heads repeated within a unit
    assert not dilated.tiles_heads(plan("longnet"))
    q, k, v = _qkv(h=6, h_kv=6)
    for chunk in (None, 64):
        kw = dict(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True, chunk_size=chunk)
        tiled = _values_and_grads(q, k, v, **kw)
        with monkeypatch.context() as m:
            m.setattr(dilated, "tiles_heads", lambda plan: False)
            summed = _values_and_grads(q, k, v, **kw)
        for a, b in zip(tiled, summed):
            assert max_abs_err(a, b) <= 1e-12

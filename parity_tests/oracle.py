"""The definition of dilated attention, executable, in NumPy float64.

This is the simplest code that can be read line by line against the definition in the README
("The definition"). It materialises the multiplicity matrix ``C`` of every head, so it is
O(h * n^2) in memory: use it for n up to a few hundred. Every implementation in this repository
(JAX, JAX ring, torch, torch ring) is tested against it.

Shapes: ``query [b, n, h, d]``, ``key``/``value [b, n, h_kv, d]``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["head_pairs", "multiplicity", "length_mask", "dilated_attention"]


def head_pairs(num_heads, segment_lengths, dilation_rates, mix):
    """For each head j, the list of (pattern index i, offset o) pairs assigned to it."""
    K = len(segment_lengths)
    if mix == "head_groups":
        # K contiguous groups of sizes h // K, the first h % K groups one larger.
        sizes = [num_heads // K + (1 if i < num_heads % K else 0) for i in range(K)]
        pairs = []
        for i, size in enumerate(sizes):
            pairs += [[(i, i % dilation_rates[i])]] * size
        return pairs
    if mix == "longnet":
        return [[(i, j % dilation_rates[i]) for i in range(K)] for j in range(num_heads)]
    raise ValueError(f"unknown {mix=}")


def multiplicity(n, num_heads, segment_lengths, dilation_rates, mix, is_causal):
    """``C[j, p, q]``: the number of (pattern, offset) pairs of head j under which p and q are
    both selected, in the same segment (and q <= p when causal).

    Segments of pattern i are ``[s*w_i, (s+1)*w_i)`` cut at n (the last one may be partial);
    ``p`` is selected with offset ``o`` iff ``(p % w_i) % r_i == o``. Where n is a multiple of every
    effective ``w' = min(w, n)`` this is the rule with ``w'`` (for ``n < w`` both hold the same
    positions)."""
    p = np.arange(n)[:, None]
    q = np.arange(n)[None, :]
    C = np.zeros((num_heads, n, n), dtype=np.int64)
    for j, pairs in enumerate(head_pairs(num_heads, segment_lengths, dilation_rates, mix)):
        for i, o in pairs:
            w = segment_lengths[i]
            r = dilation_rates[i]
            both = ((p % w) % r == o) & ((q % w) % r == o) & (p // w == q // w)
            if is_causal:
                both &= q <= p
            C[j] += both
    return C


def length_mask(n, seq_lengths, batch, segment_ids=None):
    """``[b, n, n]`` (query p, key q) True where both positions are real, ``p, q < seq_lengths[b]``
    (all True for ``seq_lengths=None``), and in the same document, ``segment_ids[b, p] ==
    segment_ids[b, q]`` (one document for ``segment_ids=None``). Padding is never a key and, as
    a query, has no key."""
    lengths = np.full(batch, n) if seq_lengths is None else np.asarray(seq_lengths).reshape(batch)
    real = np.arange(n)[None, :] < lengths[:, None]  # [b, n]
    mask = real[:, :, None] & real[:, None, :]
    if segment_ids is not None:
        ids = np.asarray(segment_ids).reshape(batch, n)
        mask &= ids[:, :, None] == ids[:, None, :]
    return mask


def dilated_attention(query, key, value, *, segment_lengths, dilation_rates, mix="head_groups",
                      is_causal=False, softmax_scale=None, seq_lengths=None, segment_ids=None):
    """Returns ``(out [b, n, h, d], lse [b, n, h])`` in float64.

    ``out_j[p] = sum_q C_j[p,q] e^{s_pq} v_q / sum_q C_j[p,q] e^{s_pq}``, ``s_pq = tau <q_p, k_q>``;
    ``lse_j[p] = log sum_q C_j[p,q] e^{s_pq}``; rows with no key: ``out = 0``, ``lse = -inf``.
    ``seq_lengths [b]``: positions ``p >= seq_lengths[b]`` are padding (``C`` is 0 in their rows
    and columns). ``segment_ids [b, n]`` (packed documents): ``C[p, q]`` is 0 unless
    ``segment_ids[b, p] == segment_ids[b, q]``; the patterns keep their global positions.
    """
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    tau = d ** -0.5 if softmax_scale is None else softmax_scale
    C = multiplicity(n, h, segment_lengths, dilation_rates, mix, is_causal)
    real = length_mask(n, seq_lengths, b, segment_ids)  # [b, n, n]
    out = np.zeros((b, n, h, d))
    lse = np.full((b, n, h), -np.inf)
    for j in range(h):
        jk = j // (h // h_kv)  # grouped-query attention: the kv head of query head j
        s = tau * np.einsum("bpd,bqd->bpq", q[:, :, j], k[:, :, jk])
        c = C[j][None] * real  # [b, n, n]
        # Subtract the row maximum over the keys that count (C > 0) for stability.
        m = np.where(c > 0, s, -np.inf).max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = c * np.exp(s - m)
        z = e.sum(axis=-1)  # [b, n]
        nonempty = z > 0
        out[:, :, j] = np.where(nonempty[..., None],
                                np.einsum("bpq,bqd->bpd", e, v[:, :, jk]) / np.where(nonempty, z, 1)[..., None],
                                0.0)
        with np.errstate(divide="ignore"):
            lse[:, :, j] = np.where(nonempty, np.log(z) + m[..., 0], -np.inf)
    return out, lse

"""Float64 autodiff reference for gradients: dense attention with additive bias ``log C``.

``C`` is the oracle's multiplicity matrix, so this computes exactly the oracle's function, but
through torch autograd: its ``(dq, dk, dv)`` are the gradients every implementation is held to.
"""

from __future__ import annotations

import torch

from parity_tests.oracle import length_mask, multiplicity

__all__ = ["reference_attention"]


def reference_attention(query, key, value, *, segment_lengths, dilation_rates, mix="head_groups",
                        is_causal=False, softmax_scale=None, seq_lengths=None, segment_ids=None):
    """Differentiable ``(out [b, n, h, d], lse [b, n, h])`` for float64 torch tensors;
    ``seq_lengths [b]`` and ``segment_ids [b, n]`` as in the oracle."""
    b, n, h, d = query.shape
    group = h // key.shape[2]
    tau = d ** -0.5 if softmax_scale is None else softmax_scale
    C = multiplicity(n, h, segment_lengths, dilation_rates, mix, is_causal)[None]  # [1, h, n, n]
    lengths = None if seq_lengths is None else torch.as_tensor(seq_lengths).cpu().numpy()
    ids = None if segment_ids is None else torch.as_tensor(segment_ids).cpu().numpy()
    C = torch.from_numpy(C * length_mask(n, lengths, b, ids)[:, None])  # [b, h, n, n]
    bias = torch.log(C.to(query.dtype))  # -inf where C = 0
    empty = C.sum(-1) == 0  # [b, h, n]: rows with no key
    k = key.repeat_interleave(group, dim=2)  # [b, n, h, d]
    v = value.repeat_interleave(group, dim=2)
    s = tau * torch.einsum("bphd,bqhd->bhpq", query, k) + bias
    s = s.masked_fill(empty[..., None], 0.0)  # keep empty rows finite, zeroed below
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty, float("-inf"))  # [b, h, n]
    out = torch.einsum("bhpq,bqhd->bphd", torch.softmax(s, dim=-1), v)
    out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
    return out, lse.transpose(1, 2)

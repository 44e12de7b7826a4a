"""One parity case, and adapters that run it through each implementation with NumPy in and out.

Every adapter computes the forward ``(out, lse)`` and the gradients of
``L = sum(out * dout) + sum(lse * dlse)`` (``dlse`` is zero on rows with no key), so one call
checks the values, the LSE and the backward including the LSE cotangent.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from parity_tests.oracle import multiplicity

DTYPES = ("float64", "float32", "bfloat16")


class Result(NamedTuple):
    out: np.ndarray  # [b, n, h, d]
    lse: np.ndarray  # [b, n, h]
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray


class Inputs(NamedTuple):
    q: np.ndarray  # float64 holding values exactly representable in the case's dtype
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray
    dlse: np.ndarray


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    h: int
    h_kv: int
    d: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mix: str = "head_groups"
    is_causal: bool = False
    dtype: str = "float64"
    batch: int = 2
    seq_lengths: tuple[int, ...] | None = None  # [batch]: positions >= seq_lengths[b] are padding
    documents: tuple[tuple[int, ...], ...] | None = None  # per batch entry, its documents' lengths in order

    @property
    def segment_ids(self):
        """``[batch, n]`` int64 ids (document ``i`` of a row has id ``7 * i % 5``: not sorted), or None."""
        if self.documents is None:
            return None
        return np.stack([np.repeat([7 * i % 5 for i in range(len(docs))], docs) for docs in self.documents])

    @property
    def kwargs(self) -> dict:
        kw = dict(segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                  mix=self.mix, is_causal=self.is_causal)
        if self.seq_lengths is not None:
            kw["seq_lengths"] = self.seq_lengths
        if self.documents is not None:
            kw["segment_ids"] = self.segment_ids
        return kw

    def inputs(self, seed: int = 0) -> Inputs:
        rng = np.random.default_rng(seed)
        b, n, h, hk, d = self.batch, self.n, self.h, self.h_kv, self.d
        q, k, v = (_round_to(rng.standard_normal(s), self.dtype) for s in ((b, n, h, d), (b, n, hk, d), (b, n, hk, d)))
        empty = multiplicity(n, h, self.segment_lengths, self.dilation_rates, self.mix, self.is_causal).sum(-1) == 0
        lengths = np.full(b, n) if self.seq_lengths is None else np.asarray(self.seq_lengths)
        padding = np.arange(n)[None, :] >= lengths[:, None]  # [b, n]
        dlse = np.where(empty.T[None] | padding[..., None], 0.0, rng.standard_normal((b, n, h)))
        return Inputs(q, k, v, rng.standard_normal((b, n, h, d)), dlse)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return x.astype(dtype).astype(np.float64)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` over finite entries of ``b``; inf if the ``-inf`` patterns differ."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    fin = np.isfinite(b)
    return float(np.linalg.norm(a[fin] - b[fin]) / max(np.linalg.norm(b[fin]), 1e-300))


def max_abs_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    fin = np.isfinite(b)
    return float(np.abs(a[fin] - b[fin]).max(initial=0.0))


def tolerances(got: Result, case: Case, x: Inputs, ref: Result | None = None) -> dict[str, tuple[float, float]]:
    """``{field: (error, bound)}`` for each of out, lse, dq, dk, dv, under the case's dtype rule:

    * float64: max abs error; bound 1e-10 for out and lse, 1e-9 for gradients (only rounding differs);
    * float32: relative error ``||a - b|| / ||b||``; bound 2e-5;
    * bfloat16: relative error; bound 2x the error of a naive dense bf16 implementation on the same
      bf16-rounded inputs (flash-attn's rule).
    """
    ref = ref or reference(case, x)
    names = Result._fields
    if case.dtype == "float64":
        return {k: (max_abs_err(getattr(got, k), getattr(ref, k)), 1e-10 if k in ("out", "lse") else 1e-9)
                for k in names}
    errs = {k: rel_err(getattr(got, k), getattr(ref, k)) for k in names}
    if case.dtype == "float32":
        return {k: (e, 2e-5) for k, e in errs.items()}
    naive = reference(case, x, dtype=case.dtype)
    return {k: (e, 2 * rel_err(getattr(naive, k), getattr(ref, k))) for k, e in errs.items()}


def _torch_run(fn, case: Case, x: Inputs, dtype) -> Result:
    import torch

    q, k, v = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x.q, x.k, x.v))
    out, lse = fn(q, k, v)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.double() * torch.from_numpy(x.dout)).sum() + (finite_lse.double() * torch.from_numpy(x.dlse)).sum()
    loss.backward()
    as_np = lambda t: t.detach().double().numpy()  # noqa: E731
    return Result(as_np(out), as_np(lse), as_np(q.grad), as_np(k.grad), as_np(v.grad))


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def reference(case: Case, x: Inputs, dtype: str = "float64") -> Result:
    """The float64 autodiff reference (dense attention with bias ``log C``); in a lower dtype it
    is the *naive* dense implementation whose error sets the low-precision tolerance."""
    from parity_tests.reference import reference_attention

    return _torch_run(lambda q, k, v: reference_attention(q, k, v, **case.kwargs), case, x, _torch_dtype(dtype))


def run_torch(case: Case, x: Inputs, fn=None) -> Result:
    """Runs ``fn(q, k, v) -> (out, lse)`` (default: ``ring_torch.dilated_attention``)."""
    import ring_torch

    if fn is None:
        fn = lambda q, k, v: ring_torch.dilated_attention(q, k, v, return_lse=True, **case.kwargs)  # noqa: E731
    return _torch_run(fn, case, x, _torch_dtype(case.dtype))


def run_jax(case: Case, x: Inputs, fn=None) -> Result:
    """Runs ``fn(q, k, v) -> (out, lse)`` (default: ``ring_jax.dilated_attention``) under jit."""
    import jax
    import jax.numpy as jnp

    import ring_jax

    if fn is None:
        fn = lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, **case.kwargs)  # noqa: E731
    dtype = jnp.dtype(case.dtype)

    @jax.jit
    def fwd_bwd(q, k, v, dout, dlse):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return (out, lse, *vjp((dout.astype(out.dtype), dlse.astype(lse.dtype))))

    results = fwd_bwd(*(jnp.asarray(a, dtype=dtype) for a in (x.q, x.k, x.v)), x.dout, x.dlse)
    as_np = lambda a: np.asarray(a.astype(jnp.float64) if a.dtype == jnp.bfloat16 else a, dtype=np.float64)  # noqa: E731
    return Result(*(as_np(a) for a in results))

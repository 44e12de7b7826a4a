"""The floor's pieces, shared by ``benchmarks.floor`` and ``benchmarks.kernel_table``: the shapes of
the kernel calls of a dilated layer (one per pattern and offset group of heads), their rows
pre-gathered and contiguous, the bare fused kernel on them (torch SDPA, JAX
``jax.nn.dot_product_attention``) forward and forward+backward (gradient of the summed outputs
with respect to the rows), and the library layers with the same loss."""

from __future__ import annotations


def unit_shapes(n: int, mix: str, w, r, heads: int) -> list[tuple[int, int, int]]:
    """``(segments S, heads h, rows m)`` of each kernel call on ``n`` tokens: ``head_groups``, one
    call per pattern on its group of heads (``h // K``, the first ``h % K`` one larger, one offset);
    ``longnet``, every head on every pattern, one call per (pattern, offset) group (head ``j`` runs
    pattern ``i`` at offset ``j % r_i``)."""
    K, out = len(w), []
    for i, (wi, ri) in enumerate(zip(w, r)):
        wi = min(wi, n)
        counts = ([heads // K + (i < heads % K)] if mix == "head_groups"
                  else [len(range(o, heads, ri)) for o in range(min(ri, heads))])
        out += [(n // wi, h, wi // ri) for h in counts]
    return out


def torch_rows(shapes, d: int, device, dtype=None):
    """``[q, k, v]`` of each call, ``[S, h, m, d]`` each (SDPA's layout)."""
    import torch

    dtype = dtype or torch.bfloat16
    return [[torch.randn(S, h, m, d, device=device, dtype=dtype) for _ in range(3)] for S, h, m in shapes]


def torch_floor():
    """``(fwd, fwd+bwd)`` of torch SDPA on :func:`torch_rows`, one call per unit."""
    import torch
    import torch.nn.functional as F

    def fwd(rows):
        with torch.no_grad():
            return [F.scaled_dot_product_attention(*x, is_causal=True) for x in rows]

    def both(rows):
        xs = [[t.detach().requires_grad_() for t in x] for x in rows]
        sum(F.scaled_dot_product_attention(*x, is_causal=True).float().sum() for x in xs).backward()
        return [t.grad for x in xs for t in x]

    return fwd, both


def torch_layer(**kw):
    """``(fwd, fwd+bwd)`` of ``ring_torch.dilated_attention(q, k, v, **kw)``; the backward of
    ``out.backward(ones)`` (the gradient of ``sum(out)``) with respect to q, k, v."""
    import torch

    import ring_torch

    def fwd(q, k, v):
        with torch.no_grad():
            return ring_torch.dilated_attention(q, k, v, **kw)

    def both(q, k, v):
        xs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ring_torch.dilated_attention(*xs, **kw)
        out.backward(torch.ones_like(out))
        return [t.grad for t in xs]

    return fwd, both


def jax_rows(shapes, d: int, dtype=None, seed: int = 1):
    """``(q, k, v)`` of each call, ``[S, m, h, d]`` each (``jax.nn.dot_product_attention``'s layout)."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 * len(shapes))
    return [tuple(jax.random.normal(keys[3 * i + j], (S, m, h, d), dtype) for j in range(3))
            for i, (S, h, m) in enumerate(shapes)]


def jax_floor(implementation: str | None = "cudnn"):
    """Jitted ``(fwd, fwd+bwd)`` of ``jax.nn.dot_product_attention`` on :func:`jax_rows`
    (``implementation``: ``cudnn``; ``xla`` for a CPU check; None: JAX's choice)."""
    import jax
    import jax.numpy as jnp

    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)  # noqa: E731
    fwd = jax.jit(lambda rows: [attend(*x) for x in rows])
    both = jax.jit(jax.grad(lambda rows: sum(attend(*x).astype(jnp.float32).sum() for x in rows)))
    return fwd, both


def jax_layer(**kw):
    """Jitted ``(fwd, fwd+bwd)`` of ``ring_jax.dilated_attention(q, k, v, **kw)``; fwd+bwd is
    ``grad(sum(out.astype(float32)))`` with respect to q, k, v."""
    import jax
    import jax.numpy as jnp

    import ring_jax

    attend = lambda q, k, v: ring_jax.dilated_attention(q, k, v, **kw)  # noqa: E731
    both = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    return jax.jit(attend), jax.jit(both)

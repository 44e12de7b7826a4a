"""Weights between ``ring_torch.MultiheadDilatedAttention`` and the Flax layers
``ring_jax.nnx.MultiHeadDilatedAttention`` / ``ring_jax.linen.MultiHeadDilatedAttention``.

Layout: a torch ``Linear`` weight ``[out, in]`` is a Flax ``kernel [in, out]``, its bias the
Flax bias; the torch ``LayerNorm`` weight/bias are the Flax ``scale``/``bias``. The Flax
parameter tree (``nnx.state(module, nnx.Param).to_pure_dict()`` or Linen's ``params``) is
``{"q_proj": {"kernel", "bias"}, "k_proj", "v_proj", "out_proj", "norm": {"scale", "bias"}}``
(no ``bias`` without ``use_bias``, no ``norm`` without ``layer_norm``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["torch_to_flax_tree", "flax_tree_to_state_dict", "torch_to_nnx", "nnx_to_torch",
           "torch_to_linen", "linen_to_torch", "nnx_params"]

_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def torch_to_flax_tree(torch_module) -> dict:
    """The Flax parameter tree (NumPy arrays, the torch dtype) of a torch module's state."""
    sd = torch_module.state_dict()
    tree = {}
    for name in _LINEARS:
        tree[name] = {"kernel": _np(sd[f"{name}.weight"]).T.copy()}
        if f"{name}.bias" in sd:
            tree[name]["bias"] = _np(sd[f"{name}.bias"]).copy()
    if "norm.weight" in sd:
        tree["norm"] = {"scale": _np(sd["norm.weight"]).copy(), "bias": _np(sd["norm.bias"]).copy()}
    return tree


def flax_tree_to_state_dict(tree) -> dict[str, np.ndarray]:
    """A Flax parameter (or gradient) tree as torch ``state_dict`` names and layouts (NumPy)."""
    sd = {}
    for name in _LINEARS:
        sd[f"{name}.weight"] = np.asarray(tree[name]["kernel"]).T
        if "bias" in tree[name]:
            sd[f"{name}.bias"] = np.asarray(tree[name]["bias"])
    if tree.get("norm") is not None:
        sd["norm.weight"] = np.asarray(tree["norm"]["scale"])
        sd["norm.bias"] = np.asarray(tree["norm"]["bias"])
    return sd


def _check_keys(sd_torch, sd_flax):
    if set(sd_torch) != set(sd_flax):
        raise ValueError(f"parameter names differ: torch {sorted(sd_torch)}, flax {sorted(sd_flax)}"
                         f" (use_bias / layer_norm must match)")
    for k in sd_torch:
        if tuple(sd_torch[k].shape) != tuple(sd_flax[k].shape):
            raise ValueError(f"{k}: torch shape {tuple(sd_torch[k].shape)} != flax "
                             f"{tuple(sd_flax[k].shape)}")


def nnx_params(nnx_module) -> dict:
    """The NNX module's parameter tree as a nested dict."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(nnx_module, nnx.Param))


def torch_to_nnx(torch_module, nnx_module):
    """Copies the torch module's parameters into the NNX module (in place, keeping the NNX
    parameter dtypes); returns the NNX module."""
    import jax.numpy as jnp
    from flax import nnx

    tree = torch_to_flax_tree(torch_module)
    _check_keys(torch_module.state_dict(), flax_tree_to_state_dict(nnx_params(nnx_module)))
    for name, leaves in tree.items():
        sub = getattr(nnx_module, name)
        for leaf, value in leaves.items():
            var = getattr(sub, leaf)
            assert isinstance(var, nnx.Param)
            var[...] = jnp.asarray(value, dtype=var[...].dtype)
    return nnx_module


def _load_into_torch(tree, torch_module):
    import torch

    sd_flax = flax_tree_to_state_dict(tree)
    sd = torch_module.state_dict()
    _check_keys(sd, sd_flax)
    with torch.no_grad():
        for k, t in sd.items():
            t.copy_(torch.from_numpy(np.array(sd_flax[k])).to(t.dtype))
    return torch_module


def nnx_to_torch(nnx_module, torch_module):
    """Copies the NNX module's parameters into the torch module (in place, keeping the torch
    dtypes); returns the torch module."""
    return _load_into_torch(nnx_params(nnx_module), torch_module)


def torch_to_linen(torch_module, dtype=None) -> dict:
    """The Linen ``params`` collection (``apply({"params": params}, ...)``) holding the torch
    module's parameters, as ``jnp`` arrays of ``dtype`` (default: the torch dtype)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), torch_to_flax_tree(torch_module))


def linen_to_torch(params, torch_module):
    """Copies Linen params (the ``params`` collection, or ``{"params": ...}``) into the torch
    module (in place, keeping the torch dtypes); returns the torch module."""
    if "params" in params and "q_proj" not in params:
        params = params["params"]
    return _load_into_torch(params, torch_module)


# -- helpers for the tests: one forward + backward through each framework -----------------------

def _kv(xs):
    """(query,) -> self-attention; (query, key) -> value = key; (query, key, value)."""
    return tuple(xs) + (None,) * (3 - len(xs))


def torch_value_and_grads(torch_module, xs, dout, **call):
    """``(out, [d input], {torch name: d param})`` (NumPy) of ``sum(module(*xs) * dout)``."""
    import torch

    torch_module.zero_grad()
    ts = [torch.from_numpy(np.asarray(x)).requires_grad_() for x in xs]
    out = torch_module(*_kv(ts), **call)
    (out * torch.from_numpy(np.asarray(dout)).to(out.dtype)).sum().backward()
    return (_np(out), [_np(t.grad) for t in ts],
            {n: _np(p.grad) for n, p in torch_module.named_parameters()})


def nnx_value_and_grads(nnx_module, xs, dout, **call):
    """``(out, [d input], {torch name: d param})`` (NumPy, torch layouts) of
    ``sum(module(*xs) * dout)``."""
    import jax.numpy as jnp
    from flax import nnx

    def loss(model, xs):
        out = model(*_kv(xs), **call)
        return jnp.sum(out * dout), out

    f = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (g_model, g_xs) = f(nnx_module, tuple(jnp.asarray(x) for x in xs))
    g_params = nnx.to_pure_dict(g_model)  # nnx.grad differentiates the nnx.Param leaves
    return np.asarray(out), [np.asarray(g) for g in g_xs], flax_tree_to_state_dict(g_params)


def linen_value_and_grads(linen_module, params, xs, dout, rngs=None, **call):
    """As :func:`nnx_value_and_grads` for a Linen module and its ``params``."""
    import jax
    import jax.numpy as jnp

    def loss(params, xs):
        out = linen_module.apply({"params": params}, *_kv(xs), rngs=rngs, **call)
        return jnp.sum(out * dout), out

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (g_params, g_xs) = f(params, tuple(jnp.asarray(x) for x in xs))
    return np.asarray(out), [np.asarray(g) for g in g_xs], flax_tree_to_state_dict(g_params)

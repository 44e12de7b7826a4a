"""Cached decoding through the layers (NNX, Linen, torch) and a tiny causal LM.

The layers decode in chunks and must equal their causal forward (float64); the LM (embedding, two
dilated attention layers, an MLP, a head) must generate the same greedy tokens with the cache as
with a full forward per step, in JAX and torch, and the two LMs (weights copied through
``parity_tests.bridge``) must agree. The full forward runs on the sequence padded to a multiple of
``max(w)``: it is causal, so the padding does not change the positions before it.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

import ring_jax  # noqa: E402
import ring_torch  # noqa: E402
from parity_tests import bridge  # noqa: E402

W, R = (4, 8, 16), (1, 2, 4)
E, H, H_KV, VOCAB = 16, 4, 2, 11
CHUNKS = [7, 1, 1, 7, 1, 1, 7, 7]  # 32 tokens: a prompt, single tokens, chunks across segment boundaries


def _torch_layer(mix="head_groups", seed=0):
    torch.manual_seed(seed)
    return ring_torch.MultiheadDilatedAttention(E, H, W, R, num_kv_heads=H_KV, mix=mix,
                                                dtype=torch.float64).eval()


def _chunks(x):
    p = 0
    for t in CHUNKS:
        yield x[:, p:p + t]
        p += t


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_layers_decode_equals_causal_forward(mix):
    x = np.random.default_rng(0).standard_normal((2, sum(CHUNKS), E))
    torch_layer = _torch_layer(mix)
    with torch.no_grad():
        full = torch_layer(torch.from_numpy(x), is_causal=True).numpy()
        cache = torch_layer.init_cache(2)
        outs = []
        for chunk in _chunks(torch.from_numpy(x)):
            out, cache = torch_layer(chunk, cache=cache)
            outs.append(out.numpy())
    assert np.abs(np.concatenate(outs, 1) - full).max() < 1e-12
    assert cache.position == x.shape[1]

    layer = bridge.torch_to_nnx(torch_layer, ring_jax.nnx.MultiHeadDilatedAttention(
        H, E, W, R, num_kv_heads=H_KV, mix=mix, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    layer.init_cache(x.shape, dtype=jnp.float64)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs = [np.asarray(step(layer, jnp.asarray(c))) for c in _chunks(x)]
    assert np.abs(np.concatenate(outs, 1) - full).max() < 1e-10
    assert int(layer.cache.get_value().position) == x.shape[1]

    linen = ring_jax.linen.MultiHeadDilatedAttention(H, E, W, R, num_kv_heads=H_KV, mix=mix,
                                                     param_dtype=jnp.float64, decode=True)
    variables = linen.init(jax.random.key(0), jnp.asarray(x[:, :1]))
    assert int(variables["cache"]["cached"]["state"].position) == 0  # init leaves the cache empty
    variables = {"params": bridge.torch_to_linen(torch_layer), "cache": variables["cache"]}
    apply = jax.jit(lambda v, x: linen.apply(v, x, mutable=["cache"]))
    outs = []
    for c in _chunks(x):
        out, mutated = apply(variables, jnp.asarray(c))
        variables = {"params": variables["params"], "cache": mutated["cache"]}
        outs.append(np.asarray(out))
    assert np.abs(np.concatenate(outs, 1) - full).max() < 1e-10


def test_layer_decode_errors():
    layer = ring_jax.nnx.MultiHeadDilatedAttention(H, E, W, R, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        layer(jnp.zeros((1, 1, E)), decode=True)
    with pytest.raises(ValueError, match="key=None"):
        _torch_layer()(torch.zeros(1, 1, E, dtype=torch.float64), torch.zeros(1, 1, E),
                       cache=_torch_layer().init_cache(1))


class TorchLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        f64 = dict(dtype=torch.float64)
        self.embed = torch.nn.Embedding(VOCAB, E, **f64)
        self.attn = torch.nn.ModuleList(
            ring_torch.MultiheadDilatedAttention(E, H, W, R, num_kv_heads=H_KV, **f64) for _ in range(2))
        self.fc1, self.fc2 = torch.nn.Linear(E, 2 * E, **f64), torch.nn.Linear(2 * E, E, **f64)
        self.head = torch.nn.Linear(E, VOCAB, **f64)

    def forward(self, tokens, caches=None):
        x = self.embed(tokens)
        for i, attn in enumerate(self.attn):
            x = x + (attn(x, is_causal=True) if caches is None else attn(x, cache=caches[i])[0])
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return self.head(x)


class FlaxLM(nnx.Module):
    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        self.embed = nnx.Embed(VOCAB, E, **f64)
        self.attn0, self.attn1 = (ring_jax.nnx.MultiHeadDilatedAttention(H, E, W, R, num_kv_heads=H_KV, **f64)
                                  for _ in range(2))
        self.fc1, self.fc2 = nnx.Linear(E, 2 * E, **f64), nnx.Linear(2 * E, E, **f64)
        self.head = nnx.Linear(E, VOCAB, **f64)

    def __call__(self, tokens, decode=False):
        x = self.embed(tokens)
        for attn in (self.attn0, self.attn1):
            x = x + attn(x, is_causal=True, decode=decode)
        x = x + self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
        return self.head(x)


def _copy_linear(t, f):
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())


def flax_from_torch(lm: TorchLM) -> FlaxLM:
    flax_lm = FlaxLM(nnx.Rngs(0))
    flax_lm.embed.embedding[...] = jnp.asarray(lm.embed.weight.detach().numpy())
    bridge.torch_to_nnx(lm.attn[0], flax_lm.attn0)
    bridge.torch_to_nnx(lm.attn[1], flax_lm.attn1)
    for name in ("fc1", "fc2", "head"):
        _copy_linear(getattr(lm, name), getattr(flax_lm, name))
    return flax_lm


PROMPT, NEW, PAD = [3, 1, 4, 1, 5], 14, 32  # 19 tokens: past the longest segment (16)


def _padded(tokens):
    return tokens + [0] * (PAD - len(tokens))


def generate_torch(lm, cached: bool):
    tokens, logits = list(PROMPT), []
    with torch.no_grad():
        caches = [a.init_cache(1) for a in lm.attn] if cached else None
        nxt = torch.tensor([PROMPT])
        for _ in range(NEW):
            if cached:
                last = lm(nxt, caches)[0, -1]
            else:
                last = lm(torch.tensor([_padded(tokens)]))[0, len(tokens) - 1]
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            nxt = torch.tensor([[tokens[-1]]])
    return tokens, np.stack(logits)


def generate_flax(lm, cached: bool):
    tokens, logits = list(PROMPT), []
    full = nnx.jit(lambda m, x: m(x))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    if cached:
        for attn in (lm.attn0, lm.attn1):
            attn.init_cache((1, 1, E), dtype=jnp.float64)
    nxt = jnp.asarray([PROMPT])
    for _ in range(NEW):
        if cached:
            last = step(lm, nxt)[0, -1]
        else:
            last = full(lm, jnp.asarray([_padded(tokens)]))[0, len(tokens) - 1]
        logits.append(np.asarray(last))
        tokens.append(int(jnp.argmax(last)))
        nxt = jnp.asarray([[tokens[-1]]])
    return tokens, np.stack(logits)


def test_tiny_lm_generates_the_same_tokens_with_and_without_the_cache():
    lm = TorchLM().eval()
    flax_lm = flax_from_torch(lm)
    t_full, l_full = generate_torch(lm, cached=False)
    t_cached, l_cached = generate_torch(lm, cached=True)
    f_full, fl_full = generate_flax(flax_lm, cached=False)
    f_cached, fl_cached = generate_flax(flax_lm, cached=True)
    assert len(set(t_full[len(PROMPT):])) > 2  # not a degenerate repetition
    assert t_full == t_cached == f_full == f_cached
    for logits in (l_cached, fl_full, fl_cached):
        assert np.abs(logits - l_full).max() < 1e-10

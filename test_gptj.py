"""Property tests: gptj.py against an independent float64 numpy GPT-J, and sharded runs against unsharded."""
import dataclasses
import math
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import gptj
import shard

jax.config.update("jax_default_matmul_precision", "highest")

# Every (dp, mp) mesh that fits on the 8 simulated devices, but data parallelism alone over 5, 6 or 7 devices
# (3 and 8 cover an odd and the largest count; every program compiles anew per mesh).
MESHES = [(dp, mp) for dp in range(1, 9) for mp in range(1, 9) if dp * mp <= 8 and not (mp == 1 and dp in (5, 6, 7))]


def random_params(cfg, seed, scale=0.5):
    """Every parameter random, LayerNorms and biases included, so that a misplaced bias or norm shows: the
    initialisation plus noise, drawn with numpy (fast: the properties draw a set per example)."""
    rng = np.random.default_rng(seed)
    std = {"1/sqrt(d)": cfg.d_model ** -0.5, "1/sqrt(V)": cfg.n_vocab ** -0.5,
           "(2/L)/sqrt(d)": 2 / cfg.n_layer * cfg.d_model ** -0.5, "ones": 0.0, "zeros": 0.0}
    leaves = {}
    for name, shape in gptj.param_shapes(cfg).items():
        init = gptj.PARAMS[name][1]
        noise = scale / math.sqrt(shape[-1])
        x = (init == "ones") + std[init] * rng.standard_normal(shape) + noise * rng.standard_normal(shape)
        leaves[name] = x.astype(np.float32)
    return gptj.nest(leaves)


# ---------------------------------------------------------------- float64 numpy reference, written from the paper trail
def ref_forward(params, tokens, cfg, rotary="gptj"):
    """GPT-J in float64 numpy, one token position at a time in the attention, nothing shared with gptj.py."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    H, dh, rd = cfg.n_head, cfg.d_head, cfg.rotary_dim
    B, T = tokens.shape

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * w + b

    def rope(x):  # x [B, T, H, dh]
        out = x.copy()
        for t in range(T):
            for i in range(rd // 2):
                theta = t * 10000.0 ** (-2 * i / rd)
                c, s = math.cos(theta), math.sin(theta)
                if rotary == "gptj":  # interleaved pairs (2i, 2i+1)
                    a, b = 2 * i, 2 * i + 1
                else:  # NeoX half-split pairs (i, i + rd/2): used only to prove the test can tell them apart
                    a, b = i, i + rd // 2
                out[:, t, :, a] = x[:, t, :, a] * c - x[:, t, :, b] * s
                out[:, t, :, b] = x[:, t, :, b] * c + x[:, t, :, a] * s
        return out

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = p["wte"][tokens]
    for l in range(cfg.n_layer):
        w = jax.tree.map(lambda a: a[l], p["h"])
        h = ln(x, w["ln_1"]["weight"], w["ln_1"]["bias"])
        q, k, v = (h @ w[n]["weight"] for n in ("q_proj", "k_proj", "v_proj"))
        q, k, v = (a.reshape(B, T, H, dh) for a in (q, k, v))
        q, k = rope(q), rope(k)
        att = np.zeros((B, T, H, dh))
        for t in range(T):
            s = np.einsum("bhd,bkhd->bhk", q[:, t], k[:, : t + 1]) / math.sqrt(dh)
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, t] = np.einsum("bhk,bkhd->bhd", s / s.sum(-1, keepdims=True), v[:, : t + 1])
        attn_out = att.reshape(B, T, H * dh) @ w["out_proj"]["weight"]
        mlp_out = gelu(h @ w["fc_in"]["weight"] + w["fc_in"]["bias"]) @ w["fc_out"]["weight"] + w["fc_out"]["bias"]
        x = x + attn_out + mlp_out
    x = ln(x, p["ln_f"]["weight"], p["ln_f"]["bias"])
    return x @ p["lm_head"]["weight"] + p["lm_head"]["bias"]


def ref_loss(logits, targets, mask, z_loss):
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0] + z_loss * lse**2
    return (nll * mask).sum() / mask.sum()


def close(a, b, tol=1e-5):
    """Agreement relative to the values' scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1.0)


CFG = gptj.Config(n_vocab=96, n_ctx=16, d_model=64, n_layer=2, n_head=4, rotary_dim=8)


def test_numerics_contract_against_float64_reference():
    params = random_params(CFG, 0)
    tokens = np.random.default_rng(0).integers(0, CFG.n_vocab, (2, 12))
    want = ref_forward(params, tokens, CFG)
    got, _ = gptj.forward(params, jnp.asarray(tokens), CFG)
    assert close(got, want, 1e-5)
    # The reference is sensitive to the conventions it pins: a NeoX rotary gives different logits.
    assert not close(ref_forward(params, tokens, CFG, rotary="neox"), want, 1e-3)

    mask = (np.arange(11) < 9)[None].repeat(2, 0).astype(np.float32)
    loss = gptj.loss_fn(params, jnp.asarray(tokens), CFG, jnp.asarray(mask), z_loss=1e-4)
    assert abs(float(loss) - ref_loss(want[:, :-1], tokens[:, 1:], mask, 1e-4)) < 1e-5


def test_rotary_matches_formula_and_passes_tail_through():
    cfg = gptj.Config(n_vocab=8, n_ctx=8, d_model=16, n_layer=1, n_head=1, rotary_dim=4)
    sin, cos = gptj.rotary_table(cfg)
    x = np.arange(1.0, 17.0, dtype=np.float32).reshape(1, 1, 1, 16)
    pos = 3
    y = np.asarray(gptj.apply_rotary(jnp.asarray(x), sin[None, pos : pos + 1], cos[None, pos : pos + 1]))[0, 0, 0]
    for i in range(2):  # pair (2i, 2i+1) by angle pos * 10000^(-2i/4), with the minus on the odd element
        th = pos * 10000 ** (-2 * i / 4)
        a, b = x[0, 0, 0, 2 * i], x[0, 0, 0, 2 * i + 1]
        assert np.allclose(y[2 * i : 2 * i + 2], [a * math.cos(th) - b * math.sin(th), b * math.cos(th) + a * math.sin(th)])
    assert np.array_equal(y[4:], x[0, 0, 0, 4:])


def test_init_follows_the_original():
    cfg = gptj.Config(n_vocab=512, n_ctx=16, d_model=256, n_layer=4, n_head=4, rotary_dim=8, d_ff=512)
    p = gptj.init_params(cfg, jax.random.PRNGKey(0))
    trunc = 0.8796  # std of a normal truncated at +-2 sigma
    for leaf, std in [(p["wte"], 1 / math.sqrt(512)), (p["h"]["q_proj"]["weight"], 1 / 16),
                      (p["h"]["out_proj"]["weight"], (2 / 4) / 16), (p["h"]["fc_out"]["weight"], (2 / 4) / 16),
                      (p["lm_head"]["weight"], 1 / 16)]:
        assert abs(float(leaf.std()) / (std * trunc) - 1) < 0.05
        assert float(jnp.abs(leaf).max()) <= 2 * std + 1e-6
    for leaf in [p["h"]["fc_in"]["bias"], p["h"]["fc_out"]["bias"], p["lm_head"]["bias"], p["ln_f"]["bias"]]:
        assert not jnp.any(leaf)
    assert jnp.all(p["h"]["ln_1"]["weight"] == 1) and all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    assert sum(x.size for x in jax.tree.leaves(p)) == cfg.n_params()


def test_gptj_6b_preset():
    c = gptj.GPTJ_6B
    assert (c.n_layer, c.d_model, c.n_head, c.d_head, c.d_ff, c.rotary_dim, c.n_ctx, c.n_vocab) == (
        28, 4096, 16, 256, 16384, 64, 2048, 50400)
    assert 6.0e9 < c.n_params() < 6.1e9


@pytest.mark.parametrize("kw, msg", [
    (dict(n_head=5), "not divisible by n_head"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(dtype="int8"), "dtype"),
    (dict(n_layer=0), "positive, got n_layer=0"),
    (dict(n_head=0), "positive, got n_head=0"),  # before any division by it
    (dict(d_ff=-8), "positive, got d_ff=-8"),
])
def test_bad_config_names_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(CFG, **kw)


@pytest.mark.parametrize("dp, mp, batch, msg", [
    (1, 3, 2, "n_head=4 is not divisible by mp=3"),
    (3, 1, 4, "batch size 4 is not divisible by dp=3"),
    (4, 4, 4, "needs 16 devices but only 8"),
])
def test_impossible_splits_are_refused(dp, mp, batch, msg):
    params = gptj.init_params(CFG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=msg):
        shard.loss_fn(params, jnp.zeros((batch, 5), jnp.int32), CFG, shard.make_mesh(dp, mp))
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        shard.mesh_for(3)


def test_inputs_that_do_not_fit_are_refused_or_poisoned():
    """Too many tokens for the context or the cache raise; a cache overflow found only at run time gives NaN
    logits instead of overwriting the newest keys; ids outside the vocabulary embed as zeros, as sharded."""
    params = jax.tree.map(jnp.asarray, random_params(CFG, 2))
    with pytest.raises(ValueError, match="17 tokens do not fit the context of 16"):
        gptj.forward(params, jnp.zeros((1, 17), jnp.int32), CFG)
    fwd = jax.jit(lambda t, c: gptj.forward(params, t, CFG, cache=c))
    cache = gptj.init_cache(CFG, 1, 8)
    with pytest.raises(ValueError, match="9 tokens do not fit a cache of 8 slots"):
        fwd(jnp.zeros((1, 9), jnp.int32), cache)
    logits, cache = fwd(jnp.arange(7)[None], cache)
    logits, cache = fwd(jnp.ones((1, 1), jnp.int32), cache)  # the last free slot
    assert np.isfinite(logits).all() and int(cache["length"][0]) == 8
    logits, _ = fwd(jnp.ones((1, 1), jnp.int32), cache)
    assert np.isnan(logits).all()
    rows = gptj.embed(params["wte"], jnp.asarray([-1, CFG.n_vocab, 3]))
    assert not rows[:2].any() and (rows[2] == params["wte"][3]).all()


def test_remat_and_bf16():
    params = random_params(CFG, 1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.n_vocab, (2, 9)))
    g = jax.grad(gptj.loss_fn)(params, tokens, CFG)
    g_remat = jax.grad(gptj.loss_fn)(params, tokens, dataclasses.replace(CFG, remat=True))
    assert all(close(a, b, 1e-6) for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g)))
    lo32, _ = gptj.forward(params, tokens, CFG)
    lo16, _ = gptj.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens,
                           dataclasses.replace(CFG, dtype="bfloat16"))
    assert lo16.dtype == jnp.float32 and close(lo16, lo32, 5e-2)


def test_fp32_islands_hold_under_bf16_compute():
    """Under bf16 compute, LayerNorm, the attention softmax, the logits and the loss stay float32: each on inputs
    where the same computation in bf16 (8 significant bits) is visibly wrong, a negative control computed beside
    it, so that the island computed in bf16 would fail its assertion."""
    bf16, rng = jnp.bfloat16, np.random.default_rng(0)
    # LayerNorm of values near 64 (a bf16 ulp of 0.5 there) whose spread is a few ulps: a bf16 mean rounds
    # away a tenth of the standard deviation.
    x = (64 + 0.5 * rng.integers(-1, 2, (4, 64))).astype(np.float32)
    p = {"weight": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)}
    want = (x - x.mean(-1, keepdims=True, dtype=np.float64)) / np.sqrt(x.var(-1, keepdims=True, dtype=np.float64) + 1e-5)
    xb = jnp.asarray(x, bf16)
    mean = xb.mean(-1, keepdims=True)
    control = (xb - mean) * jax.lax.rsqrt(jnp.square(xb - mean).mean(-1, keepdims=True) + 1e-5)
    assert np.abs(np.asarray(control, np.float64) - want).max() > 0.1
    assert np.abs(np.asarray(gptj.layer_norm(xb, p, 1e-5), np.float64) - want).max() < 1e-5
    # Attention scores near 180 (a bf16 ulp of 1 there) a fraction apart: bf16 scores round the softmax's
    # weights by factors of e. The output is bf16 (probabilities rounded to 8 bits, eps 2^-8).
    q = np.full((1, 1, 1, 8), 16.0, np.float32)
    k = (4 + rng.integers(-4, 5, (1, 1, 6, 8)) / 32).astype(np.float32)  # exact in bf16, as are the products
    v = np.asarray(jnp.asarray(rng.standard_normal((1, 1, 6, 8)), bf16), np.float64)
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / math.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = ((probs / probs.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3)
    qb, kb, vb, mask = jnp.asarray(q, bf16), jnp.asarray(k, bf16), jnp.asarray(v, bf16), jnp.ones((1, 1, 6), bool)
    control = jnp.einsum("bhqk,bhkd->bqhd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", qb, kb) / math.sqrt(8)), vb)
    assert np.abs(np.asarray(control, np.float64) - want).max() > 0.1
    assert np.abs(np.asarray(gptj.attention(qb, kb, vb, mask), np.float64) - want).max() < 4 * 2.0**-8
    # The loss of logits near 300 (a bf16 ulp of 2): a bf16 log-sum-exp is off by about a nat.
    logits = (300 + rng.standard_normal((2, 5, 32))).astype(np.float32)
    targets = rng.integers(0, 32, (2, 5))
    want = np.log(np.exp(logits - 300.0).sum(-1)) + 300.0 - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    lb = jnp.asarray(logits, bf16)
    control = jax.nn.logsumexp(lb, -1) - jnp.take_along_axis(lb, jnp.asarray(targets)[..., None], -1)[..., 0]
    assert np.abs(np.asarray(control, np.float64) - want).max() > 0.1
    assert np.abs(np.asarray(gptj.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) - want).max() < 1e-4
    # Through the model, fp32 master weights cast to bf16 inside: the logits are float32 and accumulated in it
    # (a bf16 product cast up would make every logit a bf16 number), and the loss is theirs in float64.
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params, tokens = random_params(cfg, 2), jnp.asarray(rng.integers(0, CFG.n_vocab, (2, 10)), jnp.int32)
    params["lm_head"]["bias"] = np.zeros_like(params["lm_head"]["bias"])  # an fp32 bias would hide a bf16 product
    logits = gptj.forward(params, tokens[:, :-1], cfg)[0]
    assert logits.dtype == jnp.float32
    assert np.mean(np.asarray(logits) == np.asarray(logits.astype(bf16), np.float32)) < 0.05
    l64, t = np.asarray(logits, np.float64), np.asarray(tokens[:, 1:])
    want = (np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1)
            - np.take_along_axis(l64, t[..., None], -1)[..., 0]).mean()
    loss = gptj.loss_fn(params, tokens, cfg)
    assert loss.dtype == jnp.float32 and abs(float(loss) - want) < 1e-5 * want


# ---------------------------------------------------------------- sharded == unsharded
# The cost of these properties is compilation, not examples: each (mesh, shape) compiles once, on first use, and
# every drawn example reuses the programs with new values: weights, token ids (boundary and out-of-range ids too),
# masks, z-loss, padding. The shapes per mesh are the demanding case: two heads per device, a partial rotary with
# pass-through dims, two layers, per-device vocabulary and d_ff slices of odd sizes (7 and 5).
def mesh_config(mp):
    return gptj.Config(n_vocab=7 * mp, n_ctx=16, d_model=2 * mp * 8, n_head=2 * mp, n_layer=2, rotary_dim=4,
                       d_ff=5 * mp)


def token_ids(draw, cfg, shape, rng):
    """Random ids with hypothesis-chosen boundary and out-of-range ones (embedded as zeros, sharded or not)."""
    tokens = rng.integers(0, cfg.n_vocab, shape)
    special = st.sampled_from([0, cfg.n_vocab - 1, cfg.n_vocab, -1, 2**31 - 1, cfg.n_vocab // 2])
    for pos, value in draw(st.lists(st.tuples(st.integers(0, tokens.size - 1), special), max_size=4)):
        tokens.flat[pos] = value
    return tokens


@partial(jax.jit, static_argnums=3)
def unsharded(params, tokens, mask, cfg, z):
    """Loss, gradients and logits of the plain single-device model, in one compile."""
    (loss, logits), grads = jax.value_and_grad(
        lambda p: (gptj.loss_fn(p, tokens, cfg, mask, z), gptj.forward(p, tokens[:, :-1], cfg)[0]), has_aux=True)(params)
    return loss, grads, logits


@partial(jax.jit, static_argnums=(3, 5))
def sharded(params, tokens, mask, cfg, z, mesh):
    (loss, logits), grads = jax.value_and_grad(
        lambda p: (shard.loss_fn(p, tokens, cfg, mesh, mask, z), shard.forward(p, tokens[:, :-1], cfg, mesh)[0]),
        has_aux=True)(params)
    return loss, grads, logits


@pytest.mark.parametrize("dp, mp", MESHES)
@given(data=st.data())
def test_sharded_loss_grads_and_logits_equal_unsharded(dp, mp, data):
    cfg, mesh = mesh_config(mp), shard.make_mesh(dp, mp)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    B, T = 2 * dp, 7
    params = random_params(cfg, seed, scale=data.draw(st.sampled_from([0.5, 2.0]), label="scale"))
    tokens = jnp.asarray(token_ids(data.draw, cfg, (B, T + 1), rng), jnp.int32)
    keep = data.draw(st.floats(0.0, 1.0), label="fraction of targets kept")
    mask = jnp.asarray(rng.random((B, T)) < keep, jnp.float32).at[0, 0].set(1.0)
    z = jnp.float32(data.draw(st.sampled_from([1e-4, 0.0, 1e-2]), label="z_loss"))

    want = unsharded(params, tokens, mask, cfg, z)
    got = sharded(shard.place_params(params, mesh), tokens, mask, cfg, z, mesh)
    assert close(got[0], want[0]) and close(got[2], want[2])
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
        assert close(g, w), f"gradient of {jax.tree_util.keystr(path)} differs"


@partial(jax.jit, static_argnums=(3, 4))
def cached_forward(params, tokens, cache, cfg, mesh):
    if mesh is None:
        return gptj.forward(params, tokens, cfg, cache=cache)
    return shard.forward(params, tokens, cfg, mesh, cache)


@partial(jax.jit, static_argnums=1)
def full_logits(params, cfg, tokens):
    return gptj.forward(params, tokens, cfg)[0]


# bf16 (fp32 master weights, bf16 compute and cache): each path rounds activations to bf16 (eps 2^-8) at its own
# points (a decoding step's matmuls have one row), a few eps of the logits' scale apart (2.7 eps at worst
# measured): held to 8 eps, which a token read at the wrong position exceeds (checked below).
BF16_TOL = 8 * 2.0**-8


@pytest.mark.parametrize("dp, mp, per_layer, dtype", [
    (1, 1, False, "float32"), (1, 1, True, "float32"), (2, 2, False, "float32"), (2, 2, True, "float32"),
    (1, 4, False, "float32"), (4, 2, True, "float32"), (1, 8, False, "float32"),
    (1, 1, True, "bfloat16"), (2, 2, False, "bfloat16")])
@given(data=st.data())
def test_kv_cache_decoding_equals_full_forward(dp, mp, per_layer, dtype, data):
    """Rows at different positions, as a server's batch holds them: a right-padded prefill, then each row's
    cache length set back to its own prompt's, then one token per step, each row from its own position.
    Every row's logits equal those of the row alone through the plain full forward in the same dtype."""
    cfg = dataclasses.replace(mesh_config(mp), dtype=dtype)
    tol = 1e-5 if dtype == "float32" else BF16_TOL
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    B, T, prefill, steps = 2 * dp, 9, data.draw(st.sampled_from([4, 6]), label="prefill length"), 3  # two shapes
    params = random_params(cfg, seed)
    lengths = np.asarray(data.draw(st.lists(st.integers(1, prefill), min_size=B, max_size=B), label="prompts"),
                         np.int32)
    tokens = token_ids(data.draw, cfg, (B, T), rng)
    # per_layer: weights and cache as lists of layers, the unrolled path that decoding uses
    placed = dict(params, h=[jax.tree.map(lambda x: x[i], params["h"]) for i in range(cfg.n_layer)]) \
        if per_layer else params
    mesh = None if dp * mp == 1 else shard.make_mesh(dp, mp)
    if mesh is not None:
        placed = shard.place(placed, mesh, shard.param_specs(placed))
    cache = gptj.init_cache(cfg, B, prefill + steps, per_layer=per_layer)
    out, cache = cached_forward(placed, jnp.asarray(tokens[:, :prefill], jnp.int32), cache, cfg, mesh)
    got = [np.asarray(out)]
    assert (np.asarray(cache["length"]) == prefill).all()
    cache = {**cache, "length": jnp.asarray(lengths)}  # forget the padding after each prompt
    for i in range(steps):
        out, cache = cached_forward(placed, jnp.asarray(tokens[np.arange(B), lengths + i][:, None], jnp.int32), cache,
                                    cfg, mesh)
        got.append(np.asarray(out))
    assert (np.asarray(cache["length"]) == lengths + steps).all()
    want = np.asarray(full_logits(params, cfg, jnp.asarray(tokens, jnp.int32)))
    assert jax.tree.leaves(cache["k"])[0].dtype == jnp.dtype(dtype)
    for b in range(B):
        assert close(got[0][b, :lengths[b]], want[b, :lengths[b]], tol), f"row {b}: prefill differs"
        for i in range(steps):
            assert close(got[1 + i][b, 0], want[b, lengths[b] + i], tol), f"row {b} (prompt {lengths[b]}) step {i}"
    # The tolerance tells positions apart: the previous position's logits are not close to some step's.
    assert not all(close(got[1 + i][b, 0], want[b, lengths[b] + i - 1], tol) for b in range(B) for i in range(steps))
    # A row with no room left gets NaN logits, the others are untouched.
    full = {**cache, "length": jnp.zeros(B, jnp.int32).at[0].set(prefill + steps)}
    out, _ = cached_forward(placed, jnp.zeros((B, 1), jnp.int32), full, cfg, mesh)
    assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1:])).all()


@partial(jax.jit, static_argnums=4)
def chunked_attention(q, k, v, slots, chunk):
    return gptj.cached_attention(q, k, v, slots, chunk)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@given(data=st.data())
def test_cached_attention_over_chunks_equals_masked_softmax(dtype, data):
    """The running softmax over 4-slot chunks of a 16-slot cache equals one softmax over the slots each query sees,
    for decoding (one query a row) and prefill (three), rows at different points of their texts; and the chunks
    past a row's slots, read because another row of the batch reaches them, leave that row's output unchanged to
    the bit. In bf16 the two paths round the probabilities at different points: within BF16_TOL."""
    B, H, n, D = 3, 2, 16, 8
    T = data.draw(st.sampled_from([1, 3]), label="queries a row")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = data.draw(st.sampled_from([0.1, 3.0]), label="scale")  # flat and peaked softmaxes
    q, k, v = (jnp.asarray(scale * rng.standard_normal(s), dtype) for s in [(B, H, T, D)] + [(B, H, n, D)] * 2)
    # The last row reaches the cache's end, so that the loop reads every chunk for the others too.
    first = np.asarray(data.draw(st.lists(st.integers(0, n - T), min_size=B - 1, max_size=B - 1),
                                 label="first slots") + [n - T])
    slots = jnp.asarray(first[:, None] + np.arange(T), jnp.int32)
    mask = jnp.arange(n)[None, None, :] <= slots[:, :, None]
    want = np.asarray(gptj.attention(q, k, v, mask), np.float32)
    got = chunked_attention(q, k, v, slots, 4)
    assert got.dtype == q.dtype and got.shape == (B, T, H, D)
    tol = 1e-6 if dtype == "float32" else BF16_TOL
    assert close(got, want, tol)
    assert close(chunked_attention(q, k, v, slots, n), want, tol)  # one chunk: no loop
    # Every row alone in how far the loop reads (the others' slots set to its own): the same bits.
    for b in range(B):
        alone = chunked_attention(q, k, v, jnp.broadcast_to(slots[b], slots.shape), 4)
        assert np.array_equal(np.asarray(alone[b], np.float32), np.asarray(got[b], np.float32)), f"row {b}"


def test_gptj_py_and_shard_py_run_alone(tmp_path):
    """The two files users copy into their projects need nothing else of this one."""
    for module in (gptj, shard):
        (tmp_path / os.path.basename(module.__file__)).write_text(open(module.__file__).read())
    code = ("import jax, gptj, shard; c = gptj.PRESETS['tiny']; p = gptj.init_params(c, jax.random.PRNGKey(0));"
            "t = jax.numpy.zeros((1, 9), 'int32'); m = shard.make_mesh(1, 1);"
            "assert abs(shard.loss_fn(shard.place_params(p, m), t, c, m) - gptj.loss_fn(p, t, c)) < 1e-5;"
            "print(float(gptj.loss_fn(p, t, c)))")
    # A bare environment (no PYTHONPATH to this checkout); XLA's optimisations off as for every test program.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
    assert out.returncode == 0, out.stderr
    assert 5 < float(out.stdout) < 20

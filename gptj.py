"""GPT-J as pure JAX functions over a params pytree.

Standalone: imports only jax, numpy and the stdlib, so this file can be copied into another project.
Every function runs unsharded by default. Under `jax.shard_map` with the weights split Megatron-style
over a model-parallel mesh axis, pass that axis name as `mp=` and the same code computes its shard and
all-reduces with explicit `psum`s (see shard.py). Two more splits, for training models too big to replicate:
`fsdp=` names the axis every weight's "embed" axis is split over (each layer all-gathers its own weights just
before use, and again in the backward pass), and `sequence_parallel=True` splits the residual stream along the
sequence over `mp` between layers.

The params are a nested dict declared once, in PARAMS below.
"""
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Config:
    n_vocab: int = 50400  # 50257 GPT-2 tokens, padded so 8 or 16 model-parallel devices split it evenly
    n_ctx: int = 2048
    d_model: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64  # rotary embedding on the first rotary_dim dims of each head
    d_ff: int = 0  # 0 means 4 * d_model
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; params keep their own (fp32 master weights)
    remat: bool = False  # recompute each layer's activations in the backward pass

    def __post_init__(self):
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        sizes = dict(n_vocab=self.n_vocab, n_ctx=self.n_ctx, d_model=self.d_model, n_layer=self.n_layer,
                     n_head=self.n_head, d_ff=self.d_ff)
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"bad GPT-J config: sizes must be positive, got {', '.join(bad)}")
        checks = [  # safe to divide now
            (self.d_model % self.n_head == 0, f"d_model {self.d_model} not divisible by n_head {self.n_head}"),
            (self.rotary_dim % 2 == 0 and 0 <= self.rotary_dim <= self.d_model // self.n_head,
             f"rotary_dim {self.rotary_dim} must be even and at most d_head {self.d_model // self.n_head}"),
            (self.dtype in ("float32", "bfloat16", "float16"), f"dtype {self.dtype!r} is not float32/bfloat16/float16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad GPT-J config: {msg}")

    @property
    def d_head(self):
        return self.d_model // self.n_head

    def n_params(self):
        d, f, L = self.d_model, self.d_ff, self.n_layer
        return 2 * self.n_vocab * d + self.n_vocab + 2 * d + L * (4 * d * d + 2 * d * f + f + 3 * d)


GPTJ_6B = Config()
PRESETS = {
    "gptj-6b": GPTJ_6B,
    "tiny": Config(n_vocab=50304, n_ctx=256, d_model=128, n_layer=2, n_head=4, rotary_dim=16),
    "small": Config(n_vocab=50304, n_ctx=256, d_model=256, n_layer=4, n_head=8, rotary_dim=16),
}


# Every parameter, declared once: its logical axes and its initialiser. Sizes come from the config (axis_sizes);
# init_params builds the tree from this, shard.py maps the axes onto the mesh, ckpt.py checks shapes against it.
# Weights are [in, out], so `x @ w`; per-layer params are stacked on a leading "layers" axis. Initialisers as
# mesh-transformer-jax's: "ones", "zeros", or a normal truncated at 2 stddev and not rescaled (haiku's
# TruncatedNormal) with stddev "1/sqrt(d)" (d_model), "1/sqrt(V)" (n_vocab), or "(2/L)/sqrt(d)" for the
# residual-branch outputs, scaled down by depth.
PARAMS = {
    "wte":               (("vocab", "embed"),          "1/sqrt(V)"),
    "h.ln_1.weight":     (("layers", "embed"),         "ones"),
    "h.ln_1.bias":       (("layers", "embed"),         "zeros"),
    "h.q_proj.weight":   (("layers", "embed", "heads"), "1/sqrt(d)"),
    "h.k_proj.weight":   (("layers", "embed", "heads"), "1/sqrt(d)"),
    "h.v_proj.weight":   (("layers", "embed", "heads"), "1/sqrt(d)"),
    "h.out_proj.weight": (("layers", "heads", "embed"), "(2/L)/sqrt(d)"),
    "h.fc_in.weight":    (("layers", "embed", "mlp"),   "1/sqrt(d)"),
    "h.fc_in.bias":      (("layers", "mlp"),            "zeros"),
    "h.fc_out.weight":   (("layers", "mlp", "embed"),   "(2/L)/sqrt(d)"),
    "h.fc_out.bias":     (("layers", "embed"),          "zeros"),
    "ln_f.weight":       (("embed",),                   "ones"),
    "ln_f.bias":         (("embed",),                   "zeros"),
    "lm_head.weight":    (("embed", "vocab"),           "1/sqrt(d)"),
    "lm_head.bias":      (("vocab",),                   "zeros"),
}


def axis_sizes(cfg: Config) -> dict:
    return {"layers": cfg.n_layer, "vocab": cfg.n_vocab, "embed": cfg.d_model, "heads": cfg.n_head * cfg.d_head,
            "mlp": cfg.d_ff}


def param_shapes(cfg: Config) -> dict:
    """{'h.fc_in.weight': (n_layer, d_model, d_ff), ...}: every leaf's shape, flat, in PARAMS order."""
    sizes = axis_sizes(cfg)
    return {name: tuple(sizes[a] for a in axes) for name, (axes, _) in PARAMS.items()}


def nest(flat: dict) -> dict:
    """{'a.b': x} -> {'a': {'b': x}}."""
    out = {}
    for name, x in flat.items():
        *parents, last = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = x
    return out


def init_params(cfg: Config, key) -> dict:
    """fp32 params initialised as PARAMS says: the nested dict {'wte': ..., 'h': {'ln_1': ...}, ...}."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.n_vocab
    std = {"1/sqrt(d)": 1 / math.sqrt(d), "1/sqrt(V)": 1 / math.sqrt(V), "(2/L)/sqrt(d)": (2 / L) / math.sqrt(d)}
    random = [name for name, (_, init) in PARAMS.items() if init in std]
    keys = dict(zip(random, jax.random.split(key, len(random))))
    leaves = {}
    for name, shape in param_shapes(cfg).items():
        init = PARAMS[name][1]
        if init in std:
            leaves[name] = std[init] * jax.random.truncated_normal(keys[name], -2.0, 2.0, shape, jnp.float32)
        else:
            leaves[name] = (jnp.ones if init == "ones" else jnp.zeros)(shape, jnp.float32)
    return nest(leaves)


def _psum(x, mp):
    return x if mp is None else lax.psum(x, mp)


def _reduce(x, mp, sequence_parallel):
    """Sum the devices' partial [batch, seq, d_model] outputs: each keeps the whole (psum) or, sequence parallel,
    its own chunk of the sequence (reduce-scatter: the same bytes on the links, 1/mp of the result kept)."""
    if mp is not None and sequence_parallel:
        return lax.psum_scatter(x, mp, scatter_dimension=1, tiled=True)
    return _psum(x, mp)


def _whole_sequence(x, mp, sequence_parallel):
    """[batch, seq / mp, d] chunks -> [batch, seq, d] on every device, where the residual stream is split."""
    return lax.all_gather(x, mp, axis=1, tiled=True) if mp is not None and sequence_parallel else x


def gather_weights(p, prefix: str, fsdp, dtype):
    """FSDP: the weights of `p` (the subtree of PARAMS under `prefix`, "h." for one layer's) arrive split over the
    `fsdp` mesh axis along their "embed" axis; all-gather each whole. Matrices travel in the compute dtype, half
    the bytes of the fp32 masters and the values dense() would cast them to anyway; vectors (LayerNorm, biases)
    stay fp32. Leaves PARAMS does not declare (a linear hook's own, such as LoRA's adapters) arrive whole."""
    if fsdp is None:
        return p

    def gather(path, x):
        name = prefix + ".".join(str(k.key) for k in path)
        axes = PARAMS[name][0][1 if prefix == "h." else 0:] if name in PARAMS else ()
        if "embed" not in axes:
            return x
        return _all_gather(x, fsdp, axes.index("embed"), jnp.dtype(dtype) if x.ndim >= 2 else x.dtype, x.dtype)
    return jax.tree_util.tree_map_with_path(gather, p)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _all_gather(x, axis_name, axis: int, dtype, master_dtype):
    """x's shards, whole in `dtype`. The gradient comes back as its transpose, a reduce-scatter, but in x's own
    dtype (fp32 for master weights): the dp replicas' gradients are summed in fp32 as without FSDP, not rounded
    to bf16 at each step of the reduction."""
    return lax.all_gather(x.astype(dtype), axis_name, axis=axis, tiled=True)


def _all_gather_fwd(x, axis_name, axis, dtype, master_dtype):
    return _all_gather(x, axis_name, axis, dtype, master_dtype), None


def _all_gather_bwd(axis_name, axis, dtype, master_dtype, _, g):
    return (lax.psum_scatter(g.astype(master_dtype), axis_name, scatter_dimension=axis, tiled=True),)


_all_gather.defvjp(_all_gather_fwd, _all_gather_bwd)


# What remat does not save when FSDP or sequence parallelism gathers: the all-gathers' results (FSDP's is the
# custom_vjp _all_gather), and pvary's, which only retype them (as differing across devices; no data moves).
_REGATHERED = ("all_gather", "custom_vjp_call", "pvary")


def _not_gathered(prim, *_, **__) -> bool:
    """A remat policy: save what the backward pass needs, except what all-gathers made (FSDP's weights, sequence
    parallel's whole-sequence activations): gathered again, they never stay whole for all layers at once."""
    return prim.name not in _REGATHERED


def layer_norm(x, p, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def rotary_table(cfg: Config):
    """sin, cos [n_ctx, rotary_dim // 2], computed in float64 as the original did, then cast."""
    inv_freq = 1.0 / (10000 ** (np.arange(0, cfg.rotary_dim, 2) / cfg.rotary_dim))
    angles = np.arange(cfg.n_ctx)[:, None] * inv_freq[None, :]
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rotary(x, sin, cos):
    """GPT-J's interleaved rotary: pairs (2i, 2i+1) rotate by angle pos * 10000^(-2i/rotary_dim).

    x [batch, seq, heads, d_head]; sin, cos [batch, seq, rotary_dim // 2]. Dims past rotary_dim pass through.
    """
    rot = 2 * sin.shape[-1]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    sin, cos = (jnp.repeat(t, 2, axis=-1)[:, :, None, :] for t in (sin, cos))
    # rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
    rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], axis=-1).reshape(x_rot.shape)
    return jnp.concatenate([(x_rot * cos + rotated * sin).astype(x.dtype), x_pass], axis=-1)


def attention(q, k, v, mask):
    """q [batch, heads, seq, d_head], k/v [batch, heads, keys, d_head], mask [batch, seq, keys] -> [batch, seq,
    heads, d_head]. Heads-major, so that both products batch over leading axes: XLA:CPU transposes any
    other layout first, a copy of the whole cache in every decoding step."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", probs, v)


KV_CHUNK = 64  # cache slots a decoding step reads at a time


def cached_attention(q, k, v, slots, chunk=KV_CHUNK):
    """attention over a KV cache, reading only its filled slots: q [batch, heads, seq, d_head], k/v [batch, heads,
    cache_len, d_head], slots [batch, seq] each query's own slot (it sees the slots up to it) -> [batch, seq,
    heads, d_head]. The keys are taken `chunk` slots at a time, up to the furthest any query sees, with a running
    softmax (maximum, sum, weighted values), so that a step costs the slots in use rather than the cache's size:
    a batch's cache is sized for its longest text to come. A chunk past a row's queries adds exactly zero to it,
    so a row's output does not depend on how far the other rows of its batch are."""
    D, n = q.shape[-1], k.shape[2]
    chunk = chunk if n % chunk == 0 else n

    def body(c, state):
        top, total, acc = state
        kc, vc = (lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=2).astype(q.dtype) for x in (k, v))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, kc, preferred_element_type=jnp.float32) / math.sqrt(D)
        scores = jnp.where(c * chunk + jnp.arange(chunk) <= slots[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
        new_top = jnp.maximum(top, scores.max(-1, keepdims=True))
        w, fade = jnp.exp(scores - new_top), jnp.exp(top - new_top)
        out = jnp.einsum("bhqk,bhkd->bhqd", w.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        return new_top, total * fade + w.sum(-1, keepdims=True), acc * fade + out

    zeros = jnp.zeros_like(q, jnp.float32)  # like q, so that under shard_map the loop's state varies as it does
    state = (zeros[..., :1] - jnp.inf, zeros[..., :1], zeros)
    if n == chunk:  # one chunk: the same arithmetic without a loop, which costs compile time in every program
        _, total, acc = body(0, state)
    else:
        _, total, acc = lax.fori_loop(0, jnp.minimum(slots.max() // chunk + 1, n // chunk), body, state)
    return (acc / total).astype(q.dtype).transpose(0, 2, 1, 3)


def dense(x, p):
    """The linear layer: x [tokens, in] @ p["weight"] [in, out] in x's dtype. forward's `linear` hook replaces it to
    compute a projection from other params (a low-rank adapter beside the weight: lora.py; quantised weights)."""
    return x @ p["weight"].astype(x.dtype)


def block(x, p, cfg: Config, sin, cos, mask, kv=None, index=None, mp=None, linear=dense, sequence_parallel=False):
    """One GPT-J layer: x + attn(ln_1(x)) + mlp(ln_1(x)), both branches from ONE LayerNorm.

    With `mp`, p holds this device's heads and d_ff slice; the two partial branch outputs are summed and
    all-reduced together with one psum (the parallel residual allows it), then fc_out's bias added once.
    sequence_parallel: x is this device's chunk of the sequence; ln_1(x) is all-gathered along the sequence
    (ONE all-gather feeds q, k, v and fc_in) and the psum becomes a reduce-scatter back to the chunk.
    kv: this layer's cache (k, v) [batch, heads, cache_len, d_head]; row b writes at slot index[b] onwards.
    """
    dt = x.dtype
    h = _whole_sequence(layer_norm(x, p["ln_1"], cfg.layer_norm_eps).astype(dt), mp, sequence_parallel)
    B, T, _ = h.shape
    # Matmuls on [batch * seq, features]: from 3-D activations XLA:CPU transposes each activation gradient
    # before computing a weight gradient, a copy per matmul (a third of the lm_head's backward pass).
    h = h.reshape(B * T, -1)
    q, k, v = (linear(h, p[n]).reshape(B, T, -1, cfg.d_head) for n in ("q_proj", "k_proj", "v_proj"))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (apply_rotary(q, sin, cos), apply_rotary(k, sin, cos), v))
    if kv is not None:
        # Each row writes at its own position: rows of one batch may be at different points of their text.
        write = jax.vmap(lambda cache, new, i: lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), i, 1))
        kv = (write(kv[0], k, index), write(kv[1], v, index))
        attn = cached_attention(q, *kv, index[:, None] + jnp.arange(T))
    else:
        attn = attention(q, k, v, mask)
    attn = linear(attn.astype(dt).reshape(B * T, -1), p["out_proj"])
    ff = linear(jax.nn.gelu(linear(h, p["fc_in"]) + p["fc_in"]["bias"].astype(dt), approximate=True), p["fc_out"])
    return x + _reduce((attn + ff).reshape(B, T, -1), mp, sequence_parallel) + p["fc_out"]["bias"].astype(dt), kv


def embed(wte, tokens, mp=None, sequence_parallel=False):
    """Look up token rows; an id outside the table embeds as zeros, on one device as on many (callers check
    ids). With `mp`, wte holds a contiguous slice of vocab rows: each device looks up the ids it owns, zeros
    elsewhere, and one psum assembles the embeddings (no one-hot matmul); sequence parallel, a reduce-scatter
    leaves each device its chunk of the sequence."""
    rows = wte.shape[0]
    local = tokens if mp is None else tokens - lax.axis_index(mp) * rows
    owned = (local >= 0) & (local < rows)
    return _reduce(jnp.where(owned[..., None], wte[jnp.clip(local, 0, rows - 1)], 0), mp, sequence_parallel)


def forward(params, tokens, cfg: Config, *, cache=None, mp=None, linear=dense, fsdp=None, sequence_parallel=False):
    """tokens [batch, seq] int -> (logits [batch, seq, n_vocab] fp32, updated cache or None).

    params["h"] is stacked (run with lax.scan) or a list of per-layer dicts (run unrolled; the cache then
    per_layer too). Without a cache, seq is at most n_ctx. cache: from init_cache; row b's tokens take the
    positions and slots from cache["length"][b] on, so the rows of a batch can be at different points of
    their texts. Each row must have room for the tokens: inside jit that cannot raise, so a row that overflows
    gets NaN logits (its write, clamped into the cache, overwrote its newest keys), never a silent answer.
    With `mp`, logits are this device's vocab slice. linear(x, p): how each layer projection is computed from
    its params (default dense). fsdp, sequence_parallel: the training splits of the module docstring; the
    logits come out whole along the sequence either way.
    """
    B, T = tokens.shape
    n_slots = T if cache is None else jax.tree.leaves(cache["k"])[0].shape[-2]
    if T > (cfg.n_ctx if cache is None else n_slots):
        raise ValueError(f"{T} tokens do not fit " + (f"the context of {cfg.n_ctx}" if cache is None else
                                                      f"a cache of {n_slots} slots"))
    dt = jnp.dtype(cfg.dtype)
    offset = jnp.zeros((B,), jnp.int32) if cache is None else cache["length"]  # [batch]
    slots = offset[:, None] + jnp.arange(T)  # [batch, seq]: a token's slot is its position
    mask = None if cache is not None else jnp.arange(T)[None, None, :] <= slots[:, :, None]  # [batch, seq, seq]
    sin, cos = (jnp.asarray(t)[jnp.clip(slots, 0, cfg.n_ctx - 1)] for t in rotary_table(cfg))

    def layer(x, inputs):
        p, kv = inputs
        p = gather_weights(p, "h.", fsdp, dt)
        return block(x, p, cfg, sin, cos, mask, kv, offset, mp, linear, sequence_parallel)

    if cfg.remat:
        layer = jax.checkpoint(layer, prevent_cse=False)
    elif fsdp is not None or sequence_parallel:
        layer = jax.checkpoint(layer, prevent_cse=False, policy=_not_gathered)
    top = gather_weights({k: v for k, v in params.items() if k != "h"}, "", fsdp, dt)
    x = embed(top["wte"], tokens, mp, sequence_parallel).astype(dt)
    kv = None if cache is None else (cache["k"], cache["v"])
    if isinstance(params["h"], list):
        # Per-layer weights and cache: an unrolled loop. From stacked weights XLA on GPUs copies each layer's
        # slice out of the stack before using it, which triples the bytes read per token when decoding.
        new_kv = []
        for i, p in enumerate(params["h"]):
            x, layer_kv = layer(x, (p, None if kv is None else (kv[0][i], kv[1][i])))
            new_kv.append(layer_kv)
        kv = None if kv is None else ([k for k, _ in new_kv], [v for _, v in new_kv])
    else:
        x, kv = lax.scan(layer, x, (params["h"], kv))
    x = layer_norm(x, top["ln_f"], cfg.layer_norm_eps).astype(dt)
    x = _whole_sequence(x, mp, sequence_parallel)
    if cache is not None:  # NaN in, NaN logits out: on the activations, not another pass over the logits
        x = jnp.where((offset + T <= n_slots)[:, None, None], x, jnp.nan)
        cache = {"k": kv[0], "v": kv[1], "length": offset + T}
    head = top["lm_head"]
    logits = jnp.dot(x.reshape(B * T, -1), head["weight"].astype(dt), preferred_element_type=jnp.float32)
    logits = (logits + head["bias"]).reshape(B, T, -1)
    return logits, cache


def init_cache(cfg: Config, batch: int, length: int | None = None, dtype=None, per_layer=False) -> dict:
    """Fixed-size KV cache: k, v [n_layer, batch, n_head, length, d_head] (per_layer: lists of n_layer
    [batch, n_head, length, d_head], for per-layer weights) and each row's number of filled slots [batch]."""
    shape = (batch, cfg.n_head, length or cfg.n_ctx, cfg.d_head)
    dtype = dtype or cfg.dtype
    zeros = (lambda: [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)]) if per_layer else (
        lambda: jnp.zeros((cfg.n_layer,) + shape, dtype))
    return {"k": zeros(), "v": zeros(), "length": jnp.zeros((batch,), jnp.int32)}


def cross_entropy(logits, targets, z_loss=0.0, mp=None):
    """Per-token next-token loss [batch, seq] from fp32 logits. With `mp`, logits are a vocab slice and the
    log-sum-exp and target logit are assembled with pmax/psum: full logits are never gathered."""
    vocab = logits.shape[-1]
    local = targets if mp is None else targets - lax.axis_index(mp) * vocab
    owned = (local >= 0) & (local < vocab)
    target_logit = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab - 1)[..., None], -1)[..., 0]
    target_logit = _psum(jnp.where(owned, target_logit, 0.0), mp)
    # The max only stabilises the exponent; its gradient cancels, so it is held constant.
    m = lax.stop_gradient(logits.max(-1))
    m = m if mp is None else lax.pmax(m, mp)
    lse = jnp.log(_psum(jnp.exp(logits - m[..., None]).sum(-1), mp)) + m
    return lse - target_logit + z_loss * jnp.square(lse)


def loss_fn(params, tokens, cfg: Config, mask=None, z_loss=0.0, linear=dense):
    """Mean next-token loss of tokens [batch, seq + 1] over positions where mask [batch, seq] is set."""
    logits, _ = forward(params, tokens[:, :-1], cfg, linear=linear)
    losses = cross_entropy(logits, tokens[:, 1:], z_loss)
    mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)

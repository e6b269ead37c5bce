"""Batched GPT-J decoding with a fixed-size KV cache, on one device or a (dp, mp) mesh.

Prompts are left-padded into one batch and prefilled in one call; then one token per step comes from the
cache. `generate` compiles that whole loop once per (batch, prompt bucket, steps) shape; `complete` can
also run the very same prefill and step one compiled call at a time, so that tokens can be shown as they
come and rows stopped early. Sampling settings are per-row arrays: a batch can mix requests. Weights may
be stacked (as trained) or per layer (`unstack`, faster to decode on GPUs).

    enc = data.tokenizer()
    row = Row(prompt_ids(enc, "To be"), 64, temperature=0.8, top_p=0.9, key=(seed, 0))
    text = enc.decode(complete(params, cfg, [row], mesh=mesh)[0])
"""
import codecs
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import data
import gptj
import shard

EOT = data.EOT
VOCAB = 50257  # GPT-2's tokens; embedding rows past them are padding for sharding and never sampled


def bucket(n: int, lo: int = 16) -> int:
    """Round up to a power of two (at least lo), so that only a few shapes are ever compiled."""
    return max(lo, 1 << max(n - 1, 0).bit_length())


def prompt_ids(enc, text: str) -> list:
    """A prompt's token ids; <|endoftext|> may be written in it, and an empty prompt is that token alone."""
    return enc.encode(text, allowed_special={"<|endoftext|>"}) or [EOT]


# ---------------------------------------------------------------- sampling

def _threshold(keys, enough):
    """Per row, the largest uint32 t for which enough(keys >= t) holds (it must hold for t = 0 and only get
    harder as t grows): decided one bit at a time, from the top. keys [B, V] -> [B, 1]."""
    def bit(i, t):
        trial = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(enough(keys >= trial), trial, t)
    return lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0], 1), jnp.uint32))


def filter_logits(logits, top_k, top_p):
    """Per row, keep the top_k largest logits (0: all), then the fewest largest whose probability reaches top_p
    (1: all); the others become -inf. The argmax always survives. logits [B, V]; top_k [B]; top_p [B].

    No sort: sorting the vocabulary is slow on CPUs and across a vocab-split mesh. Instead each cut-off is
    found by bisection over the logits' bit patterns (as uint32 they sort like the floats), 32 passes of
    elementwise compares and sums that split cleanly over the vocabulary.
    """
    bits = lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # order-preserving float -> uint32
    k = jnp.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    keep = keys >= _threshold(keys, lambda mask: mask.sum(-1, keepdims=True) >= k)
    probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    p = top_p[:, None]
    keep &= (keys >= _threshold(keys, lambda mask: jnp.where(mask, probs, 0).sum(-1, keepdims=True) >= p)) | (p >= 1)
    keep |= logits >= logits.max(-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def sample_logits(logits, keys, step, temperature, top_k, top_p, vocab=VOCAB):
    """Next token per row: argmax where temperature is 0, else a draw from the tempered, filtered softmax.

    Ids >= vocab are never chosen. keys [B, 2] uint32: one threefry key per row, folded with the step, so a
    row's draws depend on its own key only, not on which other rows share its batch.
    """
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    greedy = logits.argmax(-1).astype(jnp.int32)

    def draw(logits):
        # An infinite temperature is the uniform draw; the re-mask keeps -inf / inf from becoming NaN.
        scaled = jnp.where(logits > -jnp.inf, logits / jnp.where(temperature > 0, temperature, 1.0)[:, None], -jnp.inf)
        scaled = lax.cond(jnp.any((top_k > 0) | (top_p < 1)), filter_logits, lambda x, k, p: x, scaled, top_k, top_p)
        row_key = lambda key: jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), step)
        sampled = jax.vmap(lambda key, row: jax.random.categorical(row_key(key), row))(keys, scaled)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    # Filtering and drawing cost as much as a small model's step: skip what no row needs.
    return lax.cond(jnp.any(temperature > 0), draw, lambda logits: greedy, logits)


# ---------------------------------------------------------------- generation

def unstack(params, free=False) -> dict:
    """The same weights with "h" a list of per-layer dicts, each weight its own array.

    Decoding is bound by reading every weight once per token. From weights stacked over layers, XLA on GPU
    first copies each layer's slice out of the stack, which triples that traffic (GPT-J-6B, bfloat16, batch
    1 on an H100: 75 tokens/s stacked, 215 per-layer, against a bound of 228). free: take params["h"] out
    of `params` and drop each stacked weight once split, so that memory peaks at the model plus one weight.
    """
    leaves, tree = jax.tree.flatten(params.pop("h") if free else params["h"])
    split = jax.jit(lambda x: [x[i] for i in range(x.shape[0])])
    parts = []
    for i in range(len(leaves)):
        parts.append(split(leaves[i]))
        if free:
            leaves[i] = None
    return {**params, "h": [tree.unflatten([p[i] for p in parts]) for i in range(len(parts[0]))]}


def forward(params, tokens, cfg, mesh=None, start=None, cache=None, linear=gptj.dense):
    """gptj.forward, or shard.forward where there is a mesh."""
    if mesh is None:
        return gptj.forward(params, tokens, cfg, start=start, cache=cache, linear=linear)
    return shard.forward(params, tokens, cfg, mesh, start, cache, linear)


def _prefill(params, tokens, start, knobs, cfg, cache_len, mesh, linear=gptj.dense):
    cache = gptj.init_cache(cfg, tokens.shape[0], cache_len, per_layer=isinstance(params["h"], list))
    if mesh is not None:  # build the cache already split, not whole on one device
        cache = lax.with_sharding_constraint(cache, shard.named(mesh, shard.cache_specs(cache)))
    # Only the last position's logits are wanted: all but the last token go in for the cache alone (their
    # logits, [B, T, n_vocab] of them, are never computed), then the last token as a first decode step.
    _, cache = forward(params, tokens[:, :-1], cfg, mesh, start, cache, linear)
    return _step(params, tokens[:, -1], start, cache, 0, knobs, cfg, mesh, linear)


def _step(params, tok, start, cache, index, knobs, cfg, mesh, linear=gptj.dense):
    logits, cache = forward(params, tok[:, None], cfg, mesh, start, cache, linear)
    return sample_logits(logits[:, -1], knobs[0], index, *knobs[1:], min(cfg.n_vocab, VOCAB)), cache


# prefill(params, tokens, start, knobs, cfg, cache_len, mesh) -> (first new token [B], cache)
prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "mesh", "linear"))
# step(params, tok, start, cache, index, knobs, cfg, mesh) -> (next token [B], cache); cache is consumed
step = jax.jit(_step, static_argnames=("cfg", "mesh", "linear"), donate_argnames=("cache",))


@partial(jax.jit, static_argnames=("cfg", "steps", "mesh", "linear"))
def generate(params, tokens, start, knobs, limit, cfg, steps, *, mesh=None, eot=EOT, linear=gptj.dense):
    """Sample up to `steps` tokens after left-padded prompts, all in one compiled loop.

    tokens [B, T] with start[b] left pads in row b; knobs: per-row sampling settings (keys [B, 2] uint32,
    temperature [B], top_k [B], top_p [B]); limit [B]: each row's own token budget. A row ends at eot or its
    limit; the loop ends when all rows have. Returns (out [B, steps] with eot after each row's end, n [B]
    tokens before it).
    """
    B, T = tokens.shape

    def record(i, tok, out, n, done):
        new = ~done & (tok != eot)
        n = n + new
        return out.at[:, i].set(jnp.where(new, tok, eot)), n, done | ~new | (n >= limit)

    def body(state):
        i, tok, cache, out, n, done = state
        tok, cache = _step(params, tok, start, cache, i, knobs, cfg, mesh, linear)
        return (i + 1, tok, cache, *record(i, tok, out, n, done))

    tok, cache = _prefill(params, tokens, start, knobs, cfg, T + steps, mesh, linear)
    out, n, done = record(0, tok, jnp.full((B, steps), eot, jnp.int32), jnp.zeros(B, jnp.int32), jnp.zeros(B, bool))
    state = lax.while_loop(lambda s: (s[0] < steps) & ~s[-1].all(), body, (jnp.int32(1), tok, cache, out, n, done))
    return state[3], state[4]


@dataclasses.dataclass
class Row:
    """One completion to make: prompt ids, a token budget, sampling settings and a key (seed, sample index)."""
    ids: list
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    key: tuple = (0, 0)


def check(rows, cfg):
    """Raise a ValueError naming the first row that cannot be generated."""
    for i, r in enumerate(rows):
        if r.max_new < 1 or not r.ids or min(r.ids) < 0 or max(r.ids) >= cfg.n_vocab:
            raise ValueError(f"completion {i} needs a non-empty prompt of ids in [0, {cfg.n_vocab}) and max_new >= 1")
        if len(r.ids) + r.max_new > cfg.n_ctx:
            raise ValueError(f"completion {i}: a prompt of {len(r.ids)} tokens plus {r.max_new} new tokens "
                             f"exceeds the context of {cfg.n_ctx}")


def pack(rows, mesh=None, eot=EOT):
    """Rows -> generate's (tokens, start, knobs, limit) and steps, padded to bucketed shapes: prompts on the
    left, the batch with dummy rows to a bucket that the mesh's dp divides."""
    dp = 1 if mesh is None else mesh.shape[shard.DP]
    B = -(-bucket(len(rows), 1) // dp) * dp
    rows = rows + [Row([eot], 1)] * (B - len(rows))
    T, steps = bucket(max(len(r.ids) for r in rows)), bucket(max(r.max_new for r in rows))
    tokens, start = np.full((B, T), eot, np.int32), np.array([T - len(r.ids) for r in rows], np.int32)
    for b, r in enumerate(rows):
        tokens[b, start[b]:] = r.ids
    # Beyond float32 and int32 the settings mean the same as at their limits: a flat draw, every token kept.
    knobs = (np.array([[k % 2**32 for k in r.key] for r in rows], np.uint32),
             np.array([min(r.temperature, 3e38) for r in rows], np.float32),
             np.array([min(r.top_k, 2**31 - 1) for r in rows], np.int32), np.array([r.top_p for r in rows], np.float32))
    return tokens, start, knobs, np.array([r.max_new for r in rows], np.int32), steps


def complete(params, cfg, rows, *, mesh=None, on_step=None, eot=EOT, linear=gptj.dense):
    """Generate every row in one batch, padded to bucketed shapes -> list of completion id lists.

    params stacked or per layer; on a mesh, placed as shard.param_specs says. Without on_step the whole
    loop is one compiled `generate`. With on_step(tok, new, done) the same prefill and step run one compiled
    call at a time, and on_step is called with numpy [rows] arrays after each: new marks the rows that tok
    extends, and setting done[r] stops row r. linear: gptj.forward's projection hook (LoRA's, for adapters
    beside frozen weights).
    """
    check(rows, cfg)
    real = len(rows)
    tokens, start, knobs, limit, steps = pack(rows, mesh, eot)
    if on_step is None:
        out, n = (np.asarray(x) for x in generate(params, tokens, start, knobs, limit, cfg, steps, mesh=mesh, eot=eot,
                                                    linear=linear))
        return [out[b, :n[b]].tolist() for b in range(real)]
    outs, done = [[] for _ in tokens], np.zeros(len(tokens), bool)
    tok, cache = prefill(params, tokens, start, knobs, cfg, tokens.shape[1] + steps, mesh, linear)
    for i in range(1, steps + 1):
        # Queue the next step before waiting for this token on the host, so the device never idles.
        ahead = step(params, tok, start, cache, jnp.int32(i), knobs, cfg, mesh, linear) if i < steps else None
        tok = np.asarray(tok)
        new = ~done & (tok != eot)
        for b in np.flatnonzero(new):
            outs[b].append(int(tok[b]))
        done |= ~new | (np.array([len(out) for out in outs]) >= limit)
        on_step(tok[:real], new[:real], done[:real])
        if done.all():
            break
        tok, cache = ahead
    return outs[:real]


class Text:
    """A completion's text as its tokens arrive, cut at the first stop string. `add` returns the new text that
    is safe to show: an unfinished UTF-8 character, or what may be the start of a stop string, is held back."""

    def __init__(self, enc, stops=()):
        self.enc, self.stops = enc, [s for s in stops if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # keeps a split character until complete
        self.ids, self.text, self.shown, self.stopped = [], "", 0, False

    def add(self, token) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.text += self.utf8.decode(self.enc.decode_single_token_bytes(int(token)))
        # A stop string cannot begin in text already shown: that text never ends with the start of one.
        hits = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text) - hold)

    def flush(self) -> str:
        """The rest of the text, once no more tokens will come."""
        if not self.stopped:
            self.text += self.utf8.decode(b"", final=True)
        return self._show(len(self.text))

    def _show(self, upto):
        delta, self.shown = self.text[self.shown:upto], max(self.shown, upto)
        return delta

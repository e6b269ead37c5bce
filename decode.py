"""Batched GPT-J decoding with a fixed-size KV cache, on one device or a (dp, mp) mesh.

Prompts are right-padded into one batch and prefilled in one call; then one token per step comes from the
cache, each row at its own position. `generate` compiles that whole loop once per (batch, prompt bucket,
steps) shape; `complete` can also run the very same prefill and step one compiled call at a time, so that
tokens can be shown as they come and rows stopped early. serve.py keeps a batch of rows decoding and lets
new rows join it (`insert`). Sampling settings are per-row arrays: a batch can mix requests. Weights may
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
from jax.sharding import NamedSharding, PartitionSpec as P

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


def sample_logits(logits, knobs, index, counts, vocab=VOCAB):
    """Next token per row: argmax where temperature is 0, else a draw from the tempered, filtered softmax.

    knobs: per-row settings (see `knobs`). OpenAI's logit bias and presence and frequency penalties shift the
    logits first: logit - count * frequency - (count > 0) * presence, with counts [B, V] how often each token
    was generated in the row so far. Ids >= vocab are never chosen. Row b's draw uses its own key folded with
    its own step count index[b], so it depends on nothing else in the batch: not the other rows, not when
    the row joined it.
    """
    usable = jnp.arange(logits.shape[-1]) < vocab
    shift = lambda x: x + knobs["bias"] - counts * knobs["frequency"][:, None] - (counts > 0) * knobs["presence"][:, None]
    shifted = jnp.any(knobs["biased"]) | jnp.any(knobs["presence"] != 0) | jnp.any(knobs["frequency"] != 0)
    logits = jnp.where(usable, lax.cond(shifted, shift, lambda x: x, logits), -jnp.inf)
    greedy = argmax(logits)
    top = jnp.take_along_axis(logits, greedy[:, None], -1)  # the row's maximum, without another pass for it
    temperature, top_k, top_p = knobs["temperature"], knobs["top_k"], knobs["top_p"]
    sampled = temperature > 0
    row_key = lambda key, i: jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), i)

    def draw(logits):
        # Shifted by the maximum before the division, so that a tiny temperature gives -inf, not inf - inf; an
        # infinite one gives the uniform draw, and the re-mask keeps the padding at -inf. The maximum becomes 0
        # and filtering keeps it, so exp needs no second shift; without filters, scaling and exp are one pass.
        t = jnp.where(sampled, temperature, 1.0)[:, None]
        scale = lambda l: jnp.where(l > -jnp.inf, (l - top) / t, -jnp.inf)
        weights = lax.cond(jnp.any(sampled & ((top_k > 0) | (top_p < 1))),
                           lambda l: jnp.exp(filter_logits(scale(l), top_k, top_p)), lambda l: jnp.exp(scale(l)), logits)
        u = jax.vmap(lambda key, i: jax.random.uniform(row_key(key, i), (2,)))(knobs["key"], index)
        return jnp.where(sampled, draw_index(weights, u), greedy).astype(jnp.int32)

    # Filtering and drawing cost as much as a small model's step: skip what no row needs.
    return lax.cond(jnp.any(sampled), draw, lambda logits: greedy, logits)


def _chunk(n: int) -> int:
    """The largest power of two up to 256 that divides n: the width of argmax's and draw_index's chunks."""
    return min(256, n & -n)


def argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum), in two levels: the chunks' maxima, then
    within the winning chunk. XLA:CPU's single-pass argmax over a vocabulary is 4 to 8x slower."""
    *lead, V = x.shape
    c = _chunk(V)
    w = x.reshape(*lead, V // c, c)
    i = w.max(-1).argmax(-1)
    return (i * c + jnp.take_along_axis(w, i[..., None, None], -2)[..., 0, :].argmax(-1)).astype(jnp.int32)


def draw_index(weights, u, chunk=256):
    """Per row, index i with probability weights[i] / sum(weights), by inverse transform: weights [B, V] >= 0,
    each row with some weight; u [B, 2] uniform in [0, 1). In two levels, a chunk of `chunk` ids by the chunks'
    total weights, then an id within it: a cumulative sum over the whole vocabulary is slow on CPUs, and a
    Gumbel draw costs a random number and two logarithms per id (31 ms against 1.1 ms for 32 rows of 50304
    ids on 2 cores).
    A zero weight is never drawn, rounding at the top end included."""
    B, V = weights.shape
    chunk = _chunk(V) if _chunk(V) >= 32 else chunk  # a chunk that divides V saves a padded copy
    w = jnp.pad(weights, ((0, 0), (0, -V % chunk))).reshape(B, -1, chunk)

    def pick(w, u):  # w [B, n]: the first index whose cumulative weight exceeds u * total, never one of weight 0
        cdf = jnp.cumsum(w, -1)
        i = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
        return jnp.minimum(i, w.shape[-1] - 1 - jnp.argmax(w[:, ::-1] > 0, -1))

    c = pick(w.sum(-1), u[:, 0])
    within = jnp.take_along_axis(w, c[:, None, None], 1)[:, 0]
    return c * chunk + pick(within, u[:, 1])


MAX_LOGPROBS = 20  # the most alternatives a request may ask for per position, as vLLM allows


def token_logprobs(logits, targets, k=0) -> dict:
    """The model's own log-probabilities: the log-softmax of the fp32 logits over the whole vocabulary, before
    any sampling setting, as lm-evaluation-harness computes them in-process. logits [..., V]; targets [...].
    -> logprob [...] of each target and, for k > 0, the k likeliest ids and theirs: top_ids, top_logprobs
    [..., k]. The target's logprob and an equal top entry are the same float, so a greedy test by == holds."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = {"logprob": jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]}
    if k == 1:  # what lm-evaluation-harness asks for: the argmax is far cheaper than top_k on CPUs
        out["top_ids"] = argmax(lp)[..., None]
        out["top_logprobs"] = jnp.take_along_axis(lp, out["top_ids"], -1)
    elif k:
        out["top_logprobs"], out["top_ids"] = lax.top_k(lp, k)
    return out


def top_bucket(k: int) -> int:
    """How many alternatives to compute when k are wanted: a few sizes only, each compiled once."""
    return 0 if k <= 0 else min(MAX_LOGPROBS, bucket(k, 1))


def finish(tok, n, done, limit, eot):
    """The one rule for when a row ends, for jax and numpy arrays alike. tok extends a row that is not done
    unless it is eot, which ends the row; a row also ends with its limit of n new tokens. -> (new, n, done)."""
    new = ~done & (tok != eot)
    n = n + new
    return new, n, done | ~new | (n >= limit)


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


def forward(params, tokens, cfg, mesh=None, cache=None, linear=gptj.dense):
    """gptj.forward, or shard.forward where there is a mesh."""
    if mesh is None:
        return gptj.forward(params, tokens, cfg, cache=cache, linear=linear)
    return shard.forward(params, tokens, cfg, mesh, cache, linear)


def _split_cache(cache, mesh):
    return cache if mesh is None else lax.with_sharding_constraint(cache, shard.named(mesh, shard.cache_specs(cache)))


def _prefill(params, tokens, lengths, knobs, cfg, cache_len, mesh, linear=gptj.dense, logprobs=None):
    B, T = tokens.shape
    cache = _split_cache(gptj.init_cache(cfg, B, cache_len, per_layer=isinstance(params["h"], list)), mesh)
    # Only each row's last position's logits are wanted: the tokens before it go in for the cache alone (their
    # logits, [B, T, n_vocab] of them, are never computed), then the last token as a first decode step. The
    # padding after a shorter prompt is overwritten as that row decodes, and never attended to before.
    _, cache = forward(params, tokens[:, :-1], cfg, mesh, cache, linear)
    cache = {**cache, "length": lengths - 1}
    last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], 1)[:, 0]
    counts = jnp.zeros((B, cfg.n_vocab), jnp.int32)
    return _step(params, last, cache, jnp.zeros(B, jnp.int32), counts, knobs, jnp.ones(B, bool), cfg, mesh, linear,
                 logprobs)


def _step(params, tok, cache, index, counts, knobs, active, cfg, mesh, linear=gptj.dense, logprobs=None):
    logits, new = forward(params, tok[:, None], cfg, mesh, cache, linear)
    logits = logits[:, -1]
    tok = sample_logits(logits, knobs, index, counts, min(cfg.n_vocab, VOCAB))
    counts = counts.at[jnp.arange(tok.shape[0]), tok].add(active.astype(counts.dtype))
    # An idle row (a free slot, a finished row) keeps its place in the cache rather than run out of it.
    new = {**new, "length": jnp.where(active, new["length"], cache["length"])}
    out = {"token": tok} if logprobs is None else {"token": tok, **token_logprobs(logits, tok, logprobs)}
    return out, new, counts


# prefill(params, tokens [B, T], lengths [B], knobs, cfg, cache_len, mesh, linear, logprobs) -> (out, cache, counts):
# out["token"] [B] is each row's first new token (with `logprobs` not None: its logprob, and that many
# alternatives), cache holds the prompts, counts [B, V] the new tokens so far.
prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "mesh", "linear", "logprobs"))
# step(params, tok [B], cache, index [B], counts, knobs, active [B], cfg, mesh, linear, logprobs) -> (out, cache,
# counts): the next token per row; index is each row's own step count (its key's), active rows advance.
step = jax.jit(_step, static_argnames=("cfg", "mesh", "linear", "logprobs"), donate_argnames=("cache", "counts"))


@partial(jax.jit, static_argnames=("cfg", "steps", "mesh", "linear"))
def generate(params, tokens, lengths, knobs, limit, cfg, steps, *, mesh=None, eot=EOT, linear=gptj.dense):
    """Sample up to `steps` tokens after right-padded prompts, all in one compiled loop.

    tokens [B, T], row b's prompt its first lengths[b] tokens; knobs: per-row sampling settings (`knobs`);
    limit [B]: each row's own token budget. Rows end by `finish`; the loop ends when all rows have. Returns
    (out [B, steps] with eot after each row's end, n [B] tokens before it).
    """
    B, T = tokens.shape

    def record(i, tok, out, n, done):
        new, n, done = finish(tok, n, done, limit, eot)
        return out.at[:, i].set(jnp.where(new, tok, eot)), n, done

    def body(state):
        i, tok, cache, counts, out, n, done = state
        o, cache, counts = _step(params, tok, cache, jnp.full(B, i), counts, knobs, ~done, cfg, mesh, linear)
        return (i + 1, o["token"], cache, counts, *record(i, o["token"], out, n, done))

    o, cache, counts = _prefill(params, tokens, lengths, knobs, cfg, T + steps, mesh, linear)
    out, n, done = record(0, o["token"], jnp.full((B, steps), eot, jnp.int32), jnp.zeros(B, jnp.int32),
                          jnp.zeros(B, bool))
    state = (jnp.int32(1), o["token"], cache, counts, out, n, done)
    state = lax.while_loop(lambda s: (s[0] < steps) & ~s[-1].all(), body, state)
    return state[4], state[5]


@dataclasses.dataclass
class Row:
    """One completion to make: prompt ids, a token budget, sampling settings and a key (seed, sample index);
    presence and frequency penalties and a logit bias {id: value}, as OpenAI defines them."""
    ids: list
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    key: tuple = (0, 0)
    presence: float = 0.0
    frequency: float = 0.0
    bias: dict = dataclasses.field(default_factory=dict)


def check(rows, cfg):
    """Raise a ValueError naming the first row that cannot be generated."""
    for i, r in enumerate(rows):
        if r.max_new < 1 or not r.ids or min(r.ids) < 0 or max(r.ids) >= cfg.n_vocab:
            raise ValueError(f"completion {i} needs a non-empty prompt of ids in [0, {cfg.n_vocab}) and max_new >= 1")
        if len(r.ids) + r.max_new > cfg.n_ctx:
            raise ValueError(f"completion {i}: a prompt of {len(r.ids)} tokens plus {r.max_new} new tokens "
                             f"exceeds the context of {cfg.n_ctx}")


def knobs(rows, n_vocab) -> dict:
    """Rows' sampling settings as the arrays sample_logits takes, one entry per row."""
    bias = np.zeros((len(rows), n_vocab), np.float32)
    for b, r in enumerate(rows):
        for t, v in r.bias.items():
            bias[b, t] = v
    # Beyond float32 and int32 the settings mean the same as at their limits: a flat draw, every token kept.
    return {"key": np.array([[k % 2**32 for k in r.key] for r in rows], np.uint32).reshape(-1, 2),
            "temperature": np.array([min(r.temperature, 3e38) for r in rows], np.float32),
            "top_k": np.array([min(r.top_k, 2**31 - 1) for r in rows], np.int32),
            "top_p": np.array([r.top_p for r in rows], np.float32),
            "presence": np.array([r.presence for r in rows], np.float32),
            "frequency": np.array([r.frequency for r in rows], np.float32),
            "biased": np.array([bool(r.bias) for r in rows]), "bias": bias}


def pack_prompts(ids, batch, eot=EOT):
    """Prompts -> (tokens [batch, T], lengths [batch]): right-padded to a bucketed length; rows past the
    prompts are one-token dummies."""
    T = bucket(max(map(len, ids)))
    tokens, lengths = np.full((batch, T), eot, np.int32), np.ones(batch, np.int32)
    for b, x in enumerate(ids):
        tokens[b, :len(x)], lengths[b] = x, len(x)
    return tokens, lengths


def pack(rows, mesh=None, eot=EOT, n_vocab=VOCAB):
    """Rows -> generate's (tokens, lengths, knobs, limit) and steps, padded to bucketed shapes: each prompt on
    the right, the batch with dummy rows to a bucket that the mesh's dp divides."""
    dp = 1 if mesh is None else mesh.shape[shard.DP]
    B = -(-bucket(len(rows), 1) // dp) * dp
    rows = rows + [Row([eot], 1)] * (B - len(rows))
    tokens, lengths = pack_prompts([r.ids for r in rows], B, eot)
    return tokens, lengths, knobs(rows, n_vocab), np.array([r.max_new for r in rows], np.int32), \
        bucket(max(r.max_new for r in rows))


def put(tree, mesh=None):
    """Host arrays onto the device, or replicated over the mesh: inputs that many compiled calls reuse."""
    return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, P()))


def complete(params, cfg, rows, *, mesh=None, on_step=None, eot=EOT, linear=gptj.dense):
    """Generate every row in one batch, padded to bucketed shapes -> list of completion id lists.

    params stacked or per layer; on a mesh, placed as shard.param_specs says. Without on_step the whole
    loop is one compiled `generate`. With on_step(tok, new, done) the same prefill and step run one compiled
    call at a time, and on_step is called with numpy [rows] arrays after each: new marks the rows that tok
    extends, and setting done[r] stops row r (a stop string seen, a client gone). linear: gptj.forward's
    projection hook (LoRA's, for adapters beside frozen weights).
    """
    check(rows, cfg)
    real = len(rows)
    tokens, lengths, kn, limit, steps = pack(rows, mesh, eot, cfg.n_vocab)
    kn = put(kn, mesh)
    if on_step is None:
        out, n = (shard.host(x) for x in generate(params, tokens, lengths, kn, limit, cfg, steps, mesh=mesh, eot=eot,
                                                    linear=linear))
        return [out[b, :n[b]].tolist() for b in range(real)]
    B = len(tokens)
    outs, n, done = [[] for _ in range(B)], np.zeros(B, np.int32), np.zeros(B, bool)
    o, cache, counts = prefill(params, tokens, lengths, kn, cfg, tokens.shape[1] + steps, mesh, linear)
    for i in range(1, steps + 1):
        # Queue the next step before waiting for this token on the host, so the device never idles.
        if i < steps:
            ahead = step(params, o["token"], cache, np.full(B, i, np.int32), counts, kn, ~done, cfg, mesh, linear)
        tok = np.asarray(o["token"])
        new, n, done = finish(tok, n, done, limit, eot)
        for b in np.flatnonzero(new):
            outs[b].append(int(tok[b]))
        on_step(tok[:real], new[:real], done[:real])
        if done.all():
            break
        o, cache, counts = ahead
    return outs[:real]


def token_bytes(enc, token) -> bytes:
    """A token's bytes; the padding ids past the tokenizer's vocabulary have none."""
    return enc.decode_single_token_bytes(token) if token < enc.n_vocab else b""


def token_name(enc, token) -> str:
    """A distinct, stable name for a token, as OpenAI names them in logprobs: its text; for bytes that are not
    whole UTF-8 characters (some 340 GPT-2 tokens), "bytes:" and the bytes, such as "bytes:\\xe2\\x80"; for a
    padding id past the tokenizer's vocabulary, "<|padding:ID|>"."""
    if token >= enc.n_vocab:
        return f"<|padding:{token}|>"
    raw = enc.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


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
        self.text += self.utf8.decode(token_bytes(self.enc, int(token)))
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


# ---------------------------------------------------------------- a batch that rows join and leave (serve.py)

def _rows_put(a, b, slots):
    """Rows b into a's rows `slots` (slots past a's batch are dropped); cache k/v: into the first slots."""
    if a.ndim == 5:  # stacked k/v [layers, batch, heads, cache_len, d_head]
        return a.at[:, slots, :, :b.shape[3]].set(b, mode="drop")
    if a.ndim == 4:  # per-layer k/v [batch, heads, cache_len, d_head]
        return a.at[slots, :, :b.shape[2]].set(b, mode="drop")
    return a.at[slots].set(b, mode="drop")


@jax.jit
def rows_of(new):
    """Freshly prefilled rows ({"cache", "counts", "tok", "knobs"}), one pytree of one row each: inserted one by
    one, they compile per (batch, cache) shape, not per pair of that and the prefill's batch size."""
    one = lambda i: lambda x: x[:, i:i + 1] if x.ndim == 5 else x[i:i + 1]
    return [jax.tree.map(one(i), new) for i in range(new["tok"].shape[0])]


@partial(jax.jit, static_argnames=("mesh",), donate_argnames=("cache", "counts"))
def insert(cache, counts, tok, knobs, new, slots, mesh=None):
    """Put freshly prefilled rows into a running batch: its cache, counts [B, V], last tokens [B] and knobs.
    new: {"cache", "counts", "tok", "knobs"} of the new rows (prefill's cache may have fewer slots per row);
    slots [rows]: where each goes, or the batch size for a padding row (dropped)."""
    put = lambda a, b: _rows_put(a, b, slots)
    cache = _split_cache(jax.tree.map(put, cache, new["cache"]), mesh)
    return cache, put(counts, new["counts"]), put(tok, new["tok"]), jax.tree.map(put, knobs, new["knobs"])


@partial(jax.jit, static_argnames=("length", "mesh"))  # no donation: the new arrays have other sizes
def regroup(cache, counts, tok, knobs, order, length, mesh=None):
    """A running batch rebuilt: row r of the new one is row order[r] of the old one (an index past the old
    batch: an empty row), and the cache has `length` slots per row, grown with empty ones or cut after
    those in use. So the batch and its cache shrink when rows leave, and grow when more join."""
    take = lambda x, axis: jnp.take(x, order, axis, mode="fill", fill_value=0)

    def fit(x):  # k/v: [layers,] batch, heads, cache_len, d_head
        x = take(x, x.ndim - 4)
        n = x.shape[-2]
        if length <= n:
            return x[..., :length, :]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, length - n), (0, 0)])
    cache = {"k": jax.tree.map(fit, cache["k"]), "v": jax.tree.map(fit, cache["v"]), "length": take(cache["length"], 0)}
    return _split_cache(cache, mesh), take(counts, 0), take(tok, 0), jax.tree.map(lambda x: take(x, 0), knobs)

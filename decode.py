"""Batched GPT-J decoding with a fixed-size KV cache, on one device or a (dp, mp) mesh.

Prompts are right-padded into one batch and prefilled in one call; then each row decodes from the cache at its
own position. The rows being decoded are one pytree, `Batch` (the cache, each row's last token, step count,
tokens so far, budget and sampling settings), which `prefill` makes and `step` advances by up to CHUNK tokens
in one compiled call, each row ending where `finish` says, mid-chunk or not. `generate` compiles the whole loop
once per shape; `complete` runs either that or prefill and steps, so that tokens can be shown as they come and
rows stopped early. serve_engine.py keeps a Batch decoding and lets new rows join it (`insert`, `regroup`).

Where having a mesh or not is decided: `dp`, `forward`, `put`, `place`, `place_cache` and `settle`; where weights (or a
cache) stacked over layers or held per layer (`unstack`, faster to decode on GPUs) are told apart: `per_layer`.

    enc = data.tokenizer()
    row = Row(prompt_ids(enc, "To be"), 64, temperature=0.8, top_p=0.9, key=(seed, 0))
    text = enc.decode(complete(params, cfg, [row], mesh=mesh)[0])
"""
import codecs
import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import gptj
import sampling
import shard

VOCAB = 50257  # GPT-2's tokens; embedding rows past them are padding for sharding and never sampled
CHUNK = 16  # the most decoding steps one dispatch of `step` runs (the width of its output)
CHUNK_S = 0.05  # seconds a dispatch may take at most, at the measured time per step (`Pace`)


def bucket(n: int, lo: int = 16) -> int:
    """Round up to a power of two (at least lo), so that only a few shapes are ever compiled."""
    return max(lo, 1 << max(n - 1, 0).bit_length())


def prompt_ids(enc, text: str) -> list:
    """A prompt's token ids; <|endoftext|> may be written in it, and an empty prompt is that token alone."""
    return enc.encode(text, allowed_special={"<|endoftext|>"}) or [data.EOT]


# ---------------------------------------------------------------- mesh or not, stacked or per layer

def dp(mesh) -> int:
    """How many ways a batch is split: the mesh's dp, or 1 without a mesh."""
    return 1 if mesh is None else mesh.shape[shard.DP]


def mp(mesh) -> int:
    """How many ways the weights are split: the mesh's mp, or 1 without a mesh."""
    return 1 if mesh is None else mesh.shape[shard.MP]


def batch_rows(n: int, mesh) -> int:
    """n rounded up to a batch that the mesh's dp divides."""
    return -(-n // dp(mesh)) * dp(mesh)


def per_layer(tree) -> bool:
    """Weights (params["h"]) or a KV cache (cache["k"]) held as a list of layers (`unstack`), not stacked."""
    return isinstance(tree["h"] if "h" in tree else tree["k"], list)


def forward(params, tokens, cfg, mesh=None, cache=None, linear=gptj.dense):
    """gptj.forward, or shard.forward where there is a mesh."""
    if mesh is None:
        return gptj.forward(params, tokens, cfg, cache=cache, linear=linear)
    return shard.forward(params, tokens, cfg, mesh, cache, linear)


def put(tree, mesh=None):
    """Host arrays onto the device, or replicated over the mesh: inputs that many compiled calls reuse."""
    return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, P()))


def place(params, mesh=None):
    """Weights onto the device, or split over the mesh as shard.param_specs says (a no-op for weights already
    there). Host arrays passed to every compiled call would be copied to the device on every call."""
    return jax.device_put(params) if mesh is None else shard.place_params(params, mesh)


def place_cache(cache, mesh):
    """A KV cache split over the mesh by rows and heads (inside or outside jit); as it is without a mesh."""
    return cache if mesh is None else lax.with_sharding_constraint(cache, shard.named(mesh, shard.cache_specs(cache)))


def _kv(fn, cache):
    """fn(x, axis) applied to every k/v array of a cache, axis its batch axis (stacked: after the layers)."""
    axis = 0 if per_layer(cache) else 1
    return {**cache, "k": jax.tree.map(lambda x: fn(x, axis), cache["k"]),
            "v": jax.tree.map(lambda x: fn(x, axis), cache["v"])}


def unstack(params, free=False) -> dict:
    """The same weights with "h" a list of per-layer dicts, each weight its own array.

    Decoding is bound by reading every weight once per token. From weights stacked over layers, XLA on GPU
    first copies each layer's slice out of the stack, which triples that traffic (docs/performance.md).
    free: take params["h"] out of `params` and drop each stacked weight once split, so that memory peaks at
    the model plus one weight.
    """
    leaves, tree = jax.tree.flatten(params.pop("h") if free else params["h"])
    split = jax.jit(lambda x: [x[i] for i in range(x.shape[0])])
    parts = []
    for i in range(len(leaves)):
        parts.append(split(leaves[i]))
        if free:
            leaves[i] = None
    return {**params, "h": [tree.unflatten([p[i] for p in parts]) for i in range(len(parts[0]))]}


def finish(tok, n, done, limit, eot):
    """The one rule for when a row ends, for jax and numpy arrays alike. tok extends a row that is not done
    unless it is eot, which ends the row; a row also ends with its limit of n new tokens. -> (new, n, done)."""
    new = ~done & (tok != eot)
    n = n + new
    return new, n, done | ~new | (n >= limit)


# ---------------------------------------------------------------- the running batch

@partial(jax.tree_util.register_dataclass, data_fields=["cache", "tok", "index", "n", "done", "limit", "eot",
                                                        "counts", "knobs"], meta_fields=[])
@dataclasses.dataclass
class Batch:
    """Rows decoding together, all on the device: every field but the cache has the rows as its first axis.

    A row's draws depend only on its own key and step count (`index`), so not on the other rows, nor on when
    it joined. Rows that are done (by `finish`, on the device) or that the caller leaves out of `active`
    keep their place in the cache and stop changing."""
    cache: dict  # gptj.init_cache's, each row at its own length
    tok: jax.Array  # [B] each row's last token: the next step's input
    index: jax.Array  # [B] steps the row has taken: its draws' key is folded with this
    n: jax.Array  # [B] tokens in its completion so far (finish's n)
    done: jax.Array  # [B] bool: ended by eot or its limit
    limit: jax.Array  # [B] its budget of new tokens
    eot: jax.Array  # [B] the token that ends it (-1: none)
    counts: jax.Array  # [B, n_vocab] int32: how often each token was generated (the penalties)
    knobs: dict  # its sampling settings (`knobs`)

    @property
    def size(self) -> int:
        return self.tok.shape[0]

    @property
    def cache_len(self) -> int:
        return jax.tree.leaves(self.cache["k"])[0].shape[-2]


def layout(batch, mesh):
    """The shardings of a Batch's arrays on a mesh, between programs: the cache split by rows and heads
    (shard.cache_specs), every other field whole on each device; a batch of fewer rows than dp divides (a row on
    its way into a batch) whole. Every program that returns a Batch returns it so (`settle`), so that its
    output is the next program's input as compiled before serving, not an array of another layout that
    compiles the next program again."""
    specs = jax.tree.map(lambda _: P(), batch)
    if batch.size % dp(mesh) == 0:
        specs = dataclasses.replace(specs, cache=shard.cache_specs(batch.cache))
    return shard.named(mesh, specs)


def settle(batch, mesh):
    """A Batch in `layout`, inside jit; as it is without a mesh."""
    return batch if mesh is None else lax.with_sharding_constraint(batch, layout(batch, mesh))


def _rows(batch, fn, cache_fn):
    """A Batch with fn applied to every per-row array (the cache's lengths included), cache_fn(x, axis) to k/v."""
    kv = _kv(cache_fn, batch.cache)
    fields = {f: jax.tree.map(fn, getattr(batch, f)) for f in ("tok", "index", "n", "done", "limit", "eot", "counts",
                                                                "knobs")}
    return Batch(cache={**kv, "length": fn(batch.cache["length"])}, **fields)


def _advance(params, batch, run, cfg, mesh, linear, want=None):
    """One decoding step of the rows in `run` -> (the step's output, the batch after it). want: the most
    alternatives any row wants (sampling.chosen_logprobs), None for no logprobs at all."""
    logits, cache = forward(params, batch.tok[:, None], cfg, mesh, batch.cache, linear)
    logits = logits[:, -1]
    tok = sampling.sample_logits(logits, batch.knobs, batch.index, batch.counts, min(cfg.n_vocab, VOCAB))
    _, n, done = finish(tok, batch.n, batch.done, batch.limit, batch.eot)
    # A row that does not run (a free slot, a finished row) keeps its place in the cache rather than run out of it.
    cache = {**cache, "length": jnp.where(run, cache["length"], batch.cache["length"])}
    keep = lambda new, old: jnp.where(run, new, old)
    batch = dataclasses.replace(
        batch, cache=cache, tok=keep(tok, batch.tok), index=batch.index + run, n=keep(n, batch.n),
        done=keep(done, batch.done), counts=batch.counts.at[jnp.arange(tok.shape[0]), tok].add(run.astype(jnp.int32)))
    out = {"token": tok} if want is None else {"token": tok, **sampling.chosen_logprobs(logits, tok, want)}
    return out, batch


def _want(batch, run):
    return jnp.max(jnp.where(run, batch.knobs["logprobs"], -1))


def _fill(params, tokens, lengths, knobs, limit, eot, cfg, cache_len, mesh, linear=gptj.dense):
    B, T = tokens.shape
    cache = place_cache(gptj.init_cache(cfg, B, cache_len, per_layer=per_layer(params)), mesh)
    # Only each row's last position's logits are wanted: the tokens before it go in for the cache alone (their
    # logits, [B, T, n_vocab] of them, are never computed), then the last token as a first decode step. The
    # padding after a shorter prompt is overwritten as that row decodes, and never attended to before.
    _, cache = forward(params, tokens[:, :-1], cfg, mesh, cache, linear)
    cache = {**cache, "length": lengths - 1}
    last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], 1)[:, 0]
    zeros = jnp.zeros(B, jnp.int32)
    return settle(Batch(cache, last, zeros, zeros, jnp.zeros(B, bool), limit, eot,
                        jnp.zeros((B, cfg.n_vocab), jnp.int32), knobs), mesh)


def _prefill(params, tokens, lengths, knobs, limit, eot, cfg, cache_len, mesh, linear=gptj.dense, scores=True):
    batch = _fill(params, tokens, lengths, knobs, limit, eot, cfg, cache_len, mesh, linear)
    B = batch.size
    run = jnp.ones(B, bool)
    out, batch = _advance(params, batch, run, cfg, mesh, linear, _want(batch, run) if scores else None)
    return {**jax.tree.map(lambda x: x[:, None], out), "made": jnp.ones(B, jnp.int32)}, batch


def _step(params, batch, active, k, cfg, mesh, linear=gptj.dense):
    run = active & ~batch.done
    want = _want(batch, run)  # rows only leave during a chunk
    B = batch.size
    bufs = {"token": jnp.zeros((B, CHUNK), jnp.int32), "logprob": jnp.zeros((B, CHUNK), jnp.float32),
            "top_ids": jnp.zeros((B, CHUNK, sampling.MAX_LOGPROBS), jnp.int32),
            "top_logprobs": jnp.zeros((B, CHUNK, sampling.MAX_LOGPROBS), jnp.float32)}

    def body(state):
        i, batch, run, made, bufs = state
        out, batch = _advance(params, batch, run, cfg, mesh, linear, want)
        bufs = jax.tree.map(lambda buf, x: buf.at[:, i].set(x), bufs, out)
        return i + 1, batch, run & ~batch.done, made + run, bufs

    state = (jnp.int32(0), batch, run, jnp.zeros(B, jnp.int32), bufs)
    _, batch, _, made, bufs = lax.while_loop(lambda s: (s[0] < jnp.minimum(k, CHUNK)) & s[2].any(), body, state)
    return {**bufs, "made": made}, settle(batch, mesh)


# prefill(params, tokens [B, T], lengths [B], knobs, limit [B], eot [B], cfg, cache_len, mesh, linear) -> (out,
# batch): out["token"] [B, 1] is each row's first new token, with its logprob and alternatives for the rows whose
# knobs ask (sampling.chosen_logprobs), and out["made"] [B] ones; batch holds the prompts in a cache of cache_len.
prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "mesh", "linear", "scores"))
# step(params, batch, active [B], k, cfg, mesh, linear) -> (out, batch): up to k (<= CHUNK) tokens of each active
# row that is not done, in one compiled loop that ends early once none runs: out["token"] [B, CHUNK], of which row
# b's first out["made"][b] are its new tokens (each one finish's tok), logprobs likewise [B, CHUNK(, MAX_LOGPROBS)].
step = jax.jit(_step, static_argnames=("cfg", "mesh", "linear"), donate_argnames=("batch",))
# fill(params, tokens, lengths, knobs, limit, eot, cfg, cache_len, mesh, linear) -> a Batch of the prompts in a cache
# of cache_len, each row's last prompt token its next step's input: prefill without its first step, which `step`
# (k 1) then takes, with the same draws. A program with no sampling in it: quick to compile, one per prompt shape.
fill = jax.jit(_fill, static_argnames=("cfg", "cache_len", "mesh", "linear"))
first_step = step  # the same program, for a first step of freshly filled rows (tests gate `step` on servers alone)


@partial(jax.jit, static_argnames=("cfg", "steps", "mesh", "linear"))
def generate(params, tokens, lengths, knobs, limit, cfg, steps, *, mesh=None, eot=data.EOT, linear=gptj.dense):
    """Sample up to `steps` tokens after right-padded prompts, all in one compiled loop.

    tokens [B, T], row b's prompt its first lengths[b] tokens; knobs: per-row sampling settings (`knobs`);
    limit [B]: each row's own token budget. Rows end by `finish`; the loop ends when all rows have. Returns
    (out [B, steps] with eot after each row's end, n [B] tokens before it).
    """
    B, T = tokens.shape
    eots = jnp.full(B, eot, jnp.int32)
    o, batch = _prefill(params, tokens, lengths, knobs, limit, eots, cfg, T + steps, mesh, linear, scores=False)
    record = lambda out, i, tok, new: out.at[:, i].set(jnp.where(new, tok, eot))

    def body(state):
        i, batch, out = state
        o, after = _advance(params, batch, ~batch.done, cfg, mesh, linear)
        return i + 1, after, record(out, i, o["token"], after.n > batch.n)

    out = record(jnp.full((B, steps), eot, jnp.int32), 0, o["token"][:, 0], batch.n > 0)
    _, batch, out = lax.while_loop(lambda s: (s[0] < steps) & ~s[1].done.all(), body, (jnp.int32(1), batch, out))
    return out, batch.n


def empty(cfg, rows, length, params, mesh=None) -> Batch:
    """A batch of `rows` free rows with `length` cache slots each, placed for the mesh (`layout`)."""
    cache = gptj.init_cache(cfg, rows, length, per_layer=per_layer(params))
    zeros = np.zeros(rows, np.int32)
    batch = Batch(cache, zeros, zeros, zeros, np.zeros(rows, bool), zeros, zeros, np.zeros((rows, cfg.n_vocab), np.int32),
                  knobs([Row([data.EOT], 1)] * rows, cfg.n_vocab))
    return jax.device_put(batch, None if mesh is None else layout(batch, mesh))


@partial(jax.jit, static_argnames=("mesh",))
def row_of(new, i, mesh=None):
    """Row i of freshly prefilled rows as a Batch of one row: inserted one by one, they compile per (batch, cache)
    shape, not per pair of that and the prefill's batch size; i is an argument, so one program per shape."""
    one = lambda x, axis=0: lax.dynamic_slice_in_dim(x, i, 1, axis)
    return settle(_rows(new, one, one), mesh)


@partial(jax.jit, static_argnames=("mesh",), donate_argnames=("batch",))
def insert(batch, new, slots, mesh=None):
    """Put freshly prefilled rows (a Batch whose cache may have fewer slots per row) into a running batch.
    slots [rows]: where each goes, or the batch size for a padding row (dropped)."""
    fields = {f: jax.tree.map(lambda a, b: a.at[slots].set(b, mode="drop"), getattr(batch, f), getattr(new, f))
              for f in ("tok", "index", "n", "done", "limit", "eot", "counts", "knobs")}

    axis = 0 if per_layer(batch.cache) else 1  # k/v: [layers,] batch, heads, cache_len, d_head

    def kv(a, b):  # into the rows' first slots
        return a.at[(slice(None),) * axis + (slots, slice(None), slice(0, b.shape[-2]))].set(b, mode="drop")
    cache = {name: jax.tree.map(kv, batch.cache[name], new.cache[name]) for name in ("k", "v")}
    cache["length"] = batch.cache["length"].at[slots].set(new.cache["length"], mode="drop")
    return settle(Batch(cache=cache, **fields), mesh)


@partial(jax.jit, static_argnames=("length", "mesh"))  # no donation: the new arrays have other sizes
def regroup(batch, order, length, mesh=None):
    """A running batch rebuilt: row r of the new one is row order[r] of the old one (an index past the old
    batch: an empty row), and the cache has `length` slots per row, grown with empty ones or cut after
    those in use. So the batch and its cache shrink when rows leave, and grow when more join."""
    take = lambda x, axis=0: jnp.take(x, order, axis, mode="fill", fill_value=0)

    def fit(x, axis):  # k/v: [layers,] batch, heads, cache_len, d_head
        x, n = take(x, axis), x.shape[-2]
        if length <= n:
            return x[..., :length, :]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, length - n), (0, 0)])
    return settle(_rows(batch, take, fit), mesh)


class Pace:
    """How many steps the next dispatch of `step` takes: one after rows join, then twice as many each dispatch
    (so a new row's first tokens come one at a time), at most `most` and at most as many as take CHUNK_S seconds
    at the time per step measured for this batch size (so that a request arriving meanwhile is not kept waiting
    long for its prefill; unless none could join: `next`'s room). Each step's tokens reach the host as one copy,
    not one per token."""

    def __init__(self, most=CHUNK, budget=CHUNK_S):
        self.most, self.budget, self.ramp, self.per_step, self.last = min(most, CHUNK), budget, 1, {}, None

    def next(self, rows, room=True) -> int:
        """room: a request arriving now could join at the next call (a free row, or one waits for a row). Without
        room the time budget does not apply: every call's first step costs more than the others (on this CPU, 32
        rows: 21 ms, then 14 ms a step), so that a full batch decodes faster in long calls."""
        seconds = self.per_step.get(rows)
        fit = self.most if seconds is None or not room else max(1, int(self.budget / seconds))
        k = max(1, min(self.ramp, self.most, fit))
        self.ramp = min(2 * self.ramp, self.most)
        return k

    def restart(self):
        """Rows joined: their next tokens one at a time again."""
        self.ramp = 1

    def read(self, rows, steps):
        """A dispatch that ran `steps` steps has just been read: time it from the read before (steps 0: another
        program's output, such as a prefill's, was read: only start timing the next)."""
        now = time.perf_counter()
        if self.last is not None and steps:
            seconds, old = (now - self.last) / steps, self.per_step.get(rows)
            self.per_step[rows] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self.last = now

    def idle(self):
        self.last, self.ramp = None, 1


# ---------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    """One completion to make: prompt ids, a token budget, sampling settings and a key (seed, sample index);
    presence and frequency penalties and a logit bias {id: value}, as OpenAI defines them; logprobs: how many
    alternatives to score beside each chosen token (None: no logprobs)."""
    ids: list
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    key: tuple = (0, 0)
    presence: float = 0.0
    frequency: float = 0.0
    bias: dict = dataclasses.field(default_factory=dict)
    logprobs: int | None = None


def check(rows, cfg):
    """Raise a ValueError naming the first row that cannot be generated."""
    for i, r in enumerate(rows):
        if r.max_new < 1 or not r.ids or min(r.ids) < 0 or max(r.ids) >= cfg.n_vocab:
            raise ValueError(f"completion {i} needs a non-empty prompt of ids in [0, {cfg.n_vocab}) and max_new >= 1")
        if len(r.ids) + r.max_new > cfg.n_ctx:
            raise ValueError(f"completion {i}: a prompt of {len(r.ids)} tokens plus {r.max_new} new tokens "
                             f"exceeds the context of {cfg.n_ctx}")


def knobs(rows, n_vocab) -> dict:
    """Rows' sampling settings as the arrays sampling.sample_logits takes, one entry per row."""
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
            "biased": np.array([bool(r.bias) for r in rows]), "bias": bias,
            "logprobs": np.array([-1 if r.logprobs is None else r.logprobs for r in rows], np.int32)}


def pack_prompts(ids, batch, eot=data.EOT):
    """Prompts -> (tokens [batch, T], lengths [batch]): right-padded to a bucketed length; rows past the
    prompts are one-token dummies."""
    T = bucket(max(map(len, ids)))
    tokens, lengths = np.full((batch, T), eot, np.int32), np.ones(batch, np.int32)
    for b, x in enumerate(ids):
        tokens[b, :len(x)], lengths[b] = x, len(x)
    return tokens, lengths


def pack(rows, mesh=None, eot=data.EOT, n_vocab=VOCAB):
    """Rows -> generate's (tokens, lengths, knobs, limit) and steps, padded to bucketed shapes: each prompt on
    the right, the batch with dummy rows to a bucket that the mesh's dp divides."""
    B = batch_rows(bucket(len(rows), 1), mesh)
    rows = rows + [Row([eot], 1)] * (B - len(rows))
    tokens, lengths = pack_prompts([r.ids for r in rows], B, eot)
    return tokens, lengths, knobs(rows, n_vocab), np.array([r.max_new for r in rows], np.int32), \
        bucket(max(r.max_new for r in rows))


def complete(params, cfg, rows, *, mesh=None, on_step=None, eot=data.EOT, linear=gptj.dense, chunk=CHUNK):
    """Generate every row in one batch, padded to bucketed shapes -> list of completion id lists.

    params stacked or per layer; on a mesh, placed as shard.param_specs says. Without on_step the whole
    loop is one compiled `generate`. With on_step(tok, new, done) the same prefill and steps run a few steps
    per compiled call (at most `chunk`, as `Pace` says; 1: one step per call), the next call queued before the
    host reads the last one's tokens, and on_step is called with numpy [rows] arrays for each step: new marks
    the rows that tok extends, and setting done[r] stops row r (a stop string seen, a client gone): its later
    tokens are not taken. linear: gptj.forward's projection hook (LoRA's, for adapters beside frozen weights).
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
    outs, n, done, pace = [[] for _ in range(B)], np.zeros(B, np.int32), np.zeros(B, bool), Pace(chunk)
    out, batch = prefill(params, tokens, lengths, kn, limit, np.full(B, eot, np.int32), cfg, tokens.shape[1] + steps,
                         mesh, linear)
    while True:
        # Queue the next steps before waiting for these tokens on the host, so the device never idles.
        ahead = step(params, batch, ~done, np.int32(pace.next(B)), cfg, mesh, linear)
        tok, made = shard.host(out["token"]), shard.host(out["made"])
        pace.read(B, int(made.max()))
        for i in range(made.max()):
            new, n, done = finish(tok[:, i], n, done | (made <= i), limit, eot)
            for b in np.flatnonzero(new):
                outs[b].append(int(tok[b, i]))
            on_step(tok[:real, i], new[:real], done[:real])
        if done.all() or not made.any():
            break
        out, batch = ahead
    return outs[:real]


# ---------------------------------------------------------------- text

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

"""Choosing tokens from logits, and the model's own log-probabilities: per-row sampling settings (temperature,
top-k, top-p, OpenAI's penalties and logit bias) applied without a sort, a two-level inverse-transform draw, a
two-level argmax, and log-softmax scores with the likeliest alternatives. Pure functions of arrays, compiled
into decode.py's and score.py's programs."""
import jax
import jax.numpy as jnp
from jax import lax


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


def sample_logits(logits, knobs, index, counts, vocab):
    """Next token per row: argmax where temperature is 0, else a draw from the tempered, filtered softmax.

    knobs: per-row settings (decode.knobs). OpenAI's logit bias and presence and frequency penalties shift the
    logits first: logit - count * frequency - (count > 0) * presence, with counts [B, V] how often each token
    was generated in the row so far. Ids >= vocab are never chosen. Row b's draw uses its own key folded with
    its own step count index[b], so it depends on nothing else in the batch: not the other rows, not when
    the row joined it.

    Each pass over the [B, V] logits costs as much as a small model's layer on a CPU, so there are few: the shift
    and mask in one, the argmax, and, where a row samples, one that tempers, exponentiates and sums by chunks. A
    cond skips what no row needs; the draw's ends in draw_index's reductions, so that it writes no [B, V] array.
    """
    usable = jnp.arange(logits.shape[-1]) < vocab
    shift = lambda x: x + knobs["bias"] - counts * knobs["frequency"][:, None] - (counts > 0) * knobs["presence"][:, None]
    shifted = jnp.any(knobs["biased"]) | jnp.any(knobs["presence"] != 0) | jnp.any(knobs["frequency"] != 0)
    logits = lax.cond(shifted, lambda x: jnp.where(usable, shift(x), -jnp.inf), lambda x: jnp.where(usable, x, -jnp.inf),
                      logits)
    greedy = argmax(logits)
    top = jnp.take_along_axis(logits, greedy[:, None], -1)  # the row's maximum, without another pass for it
    temperature, top_k, top_p = knobs["temperature"], knobs["top_k"], knobs["top_p"]
    sampled = temperature > 0
    row_key = lambda key, i: jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), i)

    def draw(logits):
        # Shifted by the maximum before the division, so that a tiny temperature gives -inf, not inf - inf; an
        # infinite one gives the uniform draw, and the re-mask keeps the padding at -inf. The maximum becomes 0
        # and filtering keeps it, so the weights exp(scores) need no second shift.
        t = jnp.where(sampled, temperature, 1.0)[:, None]
        scale = lambda l: jnp.where(l > -jnp.inf, (l - top) / t, -jnp.inf)
        u = jax.vmap(lambda key, i: jax.random.uniform(row_key(key, i), (2,)))(knobs["key"], index)
        pick = lax.cond(jnp.any(sampled & ((top_k > 0) | (top_p < 1))),
                        lambda l: draw_index(filter_logits(scale(l), top_k, top_p), u), lambda l: draw_index(scale(l), u),
                        logits)
        return jnp.where(sampled, pick, greedy).astype(jnp.int32)

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


def draw_index(scores, u, chunk=256):
    """Per row, index i with probability exp(scores[i]) / sum(exp(scores)), by inverse transform: scores [B, V]
    (-inf: never; keep them at most 0, so that exp cannot overflow), each row with some weight; u [B, 2]
    uniform in [0, 1). In two levels, a chunk of `chunk` ids by the chunks' total weights, then an id within it:
    a cumulative sum over the whole vocabulary is slow on CPUs, and a Gumbel draw costs a random number and two
    logarithms per id (docs/performance.md). The weights are summed by chunks as they are exponentiated and
    exponentiated again for the one chunk chosen, so that no [B, V] array of them is written. A weight that
    is 0 (exp underflowed) is never drawn, rounding at the top end included."""
    B, V = scores.shape
    chunk = _chunk(V) if _chunk(V) >= 32 else chunk  # a chunk that divides V saves a padded copy
    s = jnp.pad(scores, ((0, 0), (0, -V % chunk)), constant_values=-jnp.inf).reshape(B, -1, chunk)

    def pick(w, u):  # w [B, n]: the first index whose cumulative weight exceeds u * total, never one of weight 0
        cdf = jnp.cumsum(w, -1)
        i = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
        return jnp.minimum(i, w.shape[-1] - 1 - jnp.argmax(w[:, ::-1] > 0, -1))

    c = pick(jnp.exp(s).sum(-1), u[:, 0])
    within = jnp.exp(jnp.take_along_axis(s, c[:, None, None], 1)[:, 0])
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


def chosen_logprobs(logits, tok, want):
    """token_logprobs of the chosen tokens for a batch whose rows want 0 to MAX_LOGPROBS alternatives, or none
    (-1): want is the most any row wants, a traced scalar, so that one compiled program serves every request.
    None wanted: zeros, nothing computed; at most 1 (lm-evaluation-harness): the argmax; more: MAX_LOGPROBS, of
    which each row keeps its own number. -> logprob [B], top_ids and top_logprobs [B, MAX_LOGPROBS]."""
    B, K = tok.shape[0], MAX_LOGPROBS
    pad = lambda o: {"logprob": o["logprob"], "top_ids": jnp.pad(o["top_ids"], ((0, 0), (0, K - o["top_ids"].shape[1]))),
                     "top_logprobs": jnp.pad(o["top_logprobs"], ((0, 0), (0, K - o["top_logprobs"].shape[1])))}
    none = lambda: {"logprob": jnp.zeros(B, jnp.float32), "top_ids": jnp.zeros((B, K), jnp.int32),
                    "top_logprobs": jnp.zeros((B, K), jnp.float32)}
    branches = [none, lambda: pad(token_logprobs(logits, tok, 1)), lambda: pad(token_logprobs(logits, tok, K))]
    return lax.switch(jnp.where(want < 0, 0, jnp.where(want <= 1, 1, 2)), branches)

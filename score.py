"""Scoring text with GPT-J: per-token log-probabilities, rolling-window perplexity, LAMBADA.

One computation serves all of them, and the prompt logprobs that the server's `echo` returns: the model
reads right-padded rows once, and for every position the log-probability of the token that follows (and,
when asked, the likeliest alternatives) comes back from the device; full logits never leave it.
"""
import math
from functools import partial

import jax
import numpy as np

import data
import decode
import sampling


@partial(jax.jit, static_argnames=("cfg", "mesh", "k"))
def batch_scores(params, seqs, cfg, mesh=None, k=0):
    """One batch of token_scores: seqs [B, T + 1] -> logprob, greedy [B, T] (and top_ids, top_logprobs [B, T, k])
    for each token after the first."""
    logits, _ = decode.forward(params, seqs[:, :-1], cfg, mesh)
    out = sampling.token_logprobs(logits, seqs[:, 1:], k)
    # Over the whole logit vector, padding ids included, as lm-evaluation-harness scores HF's GPT-J.
    out["greedy"] = sampling.argmax(logits) == seqs[:, 1:]
    return out


def token_scores(params, cfg, seqs, *, mesh=None, batch_size=8, k=0) -> list:
    """Token sequences -> per sequence, for each token after the first: its logprob given those before it, and
    whether it is the argmax; with k, the k likeliest ids and their logprobs. A dict of numpy arrays each,
    [len(seq) - 1] (top_ids, top_logprobs [len(seq) - 1, k]). Sequences of similar length are batched,
    right-padded to a bucketed length; each is at most n_ctx + 1 tokens."""
    batch_size = decode.batch_rows(batch_size, mesh)
    results = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        length = min(decode.bucket(len(seqs[idx[0]]) - 1), cfg.n_ctx)
        batch = np.zeros((batch_size, length + 1), np.int32)
        for b, i in enumerate(idx):
            batch[b, :len(seqs[i])] = seqs[i]
        out = jax.tree.map(np.asarray, batch_scores(params, batch, cfg, mesh, k))
        for b, i in enumerate(idx):
            results[i] = {name: x[b, :len(seqs[i]) - 1] for name, x in out.items()}
    return results


def rolling_windows(tokens, n_ctx, prefix=data.EOT):
    """lm-evaluation-harness's rolling windows (max_seq_len n_ctx, context_len 1) as (seq, n) rows: the model
    reads seq[:-1] and its last n predictions score tokens, each token of `tokens` exactly once. The first
    window is conditioned on `prefix`, the later ones on as many preceding tokens as fit."""
    done = min(n_ctx, len(tokens))
    rows = [([prefix] + tokens[:done], done)] if done else []
    while done < len(tokens):
        end = min(done + n_ctx, len(tokens))
        rows.append((tokens[end - n_ctx - 1:end], end - done))
        done = end
    return rows


def score_rows(params, cfg, rows, **kw):
    """(seq, n) rows -> (summed NLL of each row's last n predictions [rows], all n greedy [rows])."""
    scores = token_scores(params, cfg, [seq for seq, _ in rows], **kw)
    nll = np.array([-s["logprob"][len(s["logprob"]) - n:].astype(np.float64).sum() for s, (_, n) in zip(scores, rows)])
    greedy = np.array([bool(s["greedy"][len(s["greedy"]) - n:].all()) for s, (_, n) in zip(scores, rows)])
    return nll, greedy


def score_text(params, cfg, text, enc, **kw) -> dict:
    """Mean NLL per token of a text, in rolling windows of the context, the first token conditioned on EOT."""
    tokens = enc.encode_ordinary(text)
    if not tokens:
        raise ValueError("nothing to score: the text is empty")
    nll, _ = score_rows(params, cfg, rolling_windows(tokens, cfg.n_ctx), **kw)
    mean = float(nll.sum() / len(tokens))
    return {"tokens": len(tokens), "nll": mean, "ppl": math.exp(mean)}


def lambada_row(text, enc, n_ctx):
    """lm-evaluation-harness's lambada_openai: the target is the last word with its leading space, and its ids
    are those the whole text has after the context's own ids."""
    context, _, word = text.rpartition(" ")
    ctx = enc.encode_ordinary(context)
    target = enc.encode_ordinary(context + " " + word)[len(ctx):]
    seq = ((ctx or [data.EOT]) + target)[-(n_ctx + 1):]  # too long: keep the end, as the harness does
    return seq, min(len(target), len(seq) - 1)


def lambada(params, cfg, texts, enc, **kw) -> dict:
    """Accuracy (every target token greedy) and perplexity (exp of the mean summed target NLL)."""
    if not texts:
        raise ValueError("no LAMBADA examples to evaluate")
    nll, greedy = score_rows(params, cfg, [lambada_row(t, enc, cfg.n_ctx) for t in texts], **kw)
    return {"n": len(texts), "acc": float(greedy.mean()), "ppl": math.exp(nll.mean())}

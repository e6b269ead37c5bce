"""score.py: per-token logprobs, rolling-window perplexity and LAMBADA against a direct computation."""
import math

import numpy as np
import pytest

import score
from test_decode import CFG, ENC, EOT, layered, log_probs, mesh_params, params  # noqa: F401 (fixtures)

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
        "To die, to sleep, no more; and by a sleep to say we end the heart-ache and the thousand natural shocks "
        "that flesh is heir to: 'tis a consummation devoutly to be wished.") * 2
LAMBADA = [TEXT[:60], TEXT[:200], TEXT, "word", TEXT[100:170]]


def direct_nll(params, tokens):
    """Mean NLL, one unbatched window at a time: window w predicts tokens [w * n_ctx, (w + 1) * n_ctx), the
    first from <|endoftext|>, later ones with the n_ctx tokens before their last target as context."""
    total, n = 0.0, CFG.n_ctx
    for first in range(0, len(tokens), n):
        end = min(first + n, len(tokens))
        context = [EOT] + tokens[:end - 1] if first == 0 else tokens[end - n - 1:end - 1]
        logp = log_probs(params, context)
        total -= sum(float(logp[len(context) - (end - j), tokens[j]]) for j in range(first, end))
    return total / len(tokens)


def test_rolling_windows_predict_every_token_once():
    for length in (1, 5, 64, 65, 128, 130):
        tokens = list(range(1000, 1000 + length))
        rows = score.rolling_windows(tokens, 64)
        predicted = [t for seq, n in rows for t in seq[-n:]]
        assert predicted == tokens and all(len(seq) <= 65 for seq, _ in rows)


def test_score_equals_direct_computation(params, layered, mesh_params):
    tokens = ENC.encode_ordinary(TEXT)
    assert 128 < len(tokens) < 192  # three windows, the last one partial
    got = score.score_text(layered, CFG, TEXT, ENC, batch_size=8)
    assert got["tokens"] == len(tokens) and got["ppl"] == pytest.approx(math.exp(got["nll"]))
    assert got["nll"] == pytest.approx(direct_nll(params, tokens), rel=1e-5)
    assert score.score_text(params, CFG, TEXT, ENC, batch_size=8)["nll"] == pytest.approx(got["nll"], rel=1e-6)
    sharded, mesh = mesh_params
    assert score.score_text(sharded, CFG, TEXT, ENC, mesh=mesh)["nll"] == pytest.approx(got["nll"], rel=1e-5)



def direct_lambada(params, texts):
    nlls, hits = [], []
    for text in texts:
        context, word = text.rsplit(" ", 1) if " " in text else ("", text)
        ctx = ENC.encode_ordinary(context)
        target = ENC.encode_ordinary(context + " " + word)[len(ctx):]
        seq = ((ctx or [EOT]) + target)[-(CFG.n_ctx + 1):]
        logp = log_probs(params, seq[:-1])[-len(target):]
        nlls.append(-sum(float(logp[i, t]) for i, t in enumerate(target)))
        hits.append(all(int(logp[i].argmax()) == t for i, t in enumerate(target)))
    return {"n": len(texts), "acc": float(np.mean(hits)), "ppl": math.exp(np.mean(nlls))}


def test_lambada_equals_direct_computation(params, layered):
    want = direct_lambada(params, LAMBADA)
    got = score.lambada(layered, CFG, LAMBADA, ENC, batch_size=2)  # several batches
    assert got["n"] == want["n"] and got["acc"] == want["acc"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def test_lambada_counts_a_greedy_target_as_correct(layered):
    # Make the model always predict " the" (one token): a target of " the" is right, any other wrong.
    the = ENC.encode_ordinary(" the")[0]
    rigged = {**layered, "lm_head": {**layered["lm_head"], "bias": layered["lm_head"]["bias"].at[the].set(100.0)}}
    got = score.lambada(rigged, CFG, ["over to the", "over to them"], ENC)
    assert got["acc"] == 0.5




def test_token_scores_are_per_position_logprobs_and_alternatives(params, layered):
    seqs = [ENC.encode_ordinary(TEXT)[:40], [EOT, 464], ENC.encode_ordinary(TEXT)[5:30]]
    got = score.token_scores(layered, CFG, seqs, batch_size=2, k=3)
    for seq, s in zip(seqs, got):
        logp = np.asarray(log_probs(params, seq))
        assert s["logprob"].shape == (len(seq) - 1,) and s["top_ids"].shape == (len(seq) - 1, 3)
        assert np.allclose(s["logprob"], logp[np.arange(len(seq) - 1), seq[1:]], atol=1e-5)
        assert (s["top_ids"] == np.argsort(-logp[:-1], -1)[:, :3]).all()
        assert (s["greedy"] == (logp[:-1].argmax(-1) == seq[1:])).all()

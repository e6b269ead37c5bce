"""score.py: per-token logprobs, rolling-window perplexity and LAMBADA against a direct computation (conftest.py's
tiny model and its log_probs reference)."""
import math

import numpy as np
import pytest

import data
import score


def direct_nll(log_probs, params, tokens, n_ctx):
    """Mean NLL, one unbatched window at a time: window w predicts tokens [w * n_ctx, (w + 1) * n_ctx), the
    first from <|endoftext|>, later ones with the n_ctx tokens before their last target as context."""
    total, n = 0.0, n_ctx
    for first in range(0, len(tokens), n):
        end = min(first + n, len(tokens))
        context = [data.EOT] + tokens[:end - 1] if first == 0 else tokens[end - n - 1:end - 1]
        logp = log_probs(params, context)
        total -= sum(float(logp[len(context) - (end - j), tokens[j]]) for j in range(first, end))
    return total / len(tokens)


def test_rolling_windows_predict_every_token_once():
    for length in (1, 5, 64, 65, 128, 130):
        tokens = list(range(1000, 1000 + length))
        rows = score.rolling_windows(tokens, 64)
        predicted = [t for seq, n in rows for t in seq[-n:]]
        assert predicted == tokens and all(len(seq) <= 65 for seq, _ in rows)


def test_score_equals_direct_computation(cfg, enc, text, log_probs, params, layered, mesh_params):
    tokens = enc.encode_ordinary(text)
    assert 128 < len(tokens) < 192  # three windows, the last one partial
    got = score.score_text(layered, cfg, text, enc, batch_size=8)
    assert got["tokens"] == len(tokens) and got["ppl"] == pytest.approx(math.exp(got["nll"]))
    assert got["nll"] == pytest.approx(direct_nll(log_probs, params, tokens, cfg.n_ctx), rel=1e-5)
    assert score.score_text(params, cfg, text, enc, batch_size=8)["nll"] == pytest.approx(got["nll"], rel=1e-6)
    sharded, mesh = mesh_params
    assert score.score_text(sharded, cfg, text, enc, mesh=mesh)["nll"] == pytest.approx(got["nll"], rel=1e-5)


def test_lambada_equals_direct_computation(cfg, enc, lambada_texts, direct_lambada, params, layered):
    want = direct_lambada(params, lambada_texts)
    got = score.lambada(layered, cfg, lambada_texts, enc, batch_size=2)  # several batches
    assert got["n"] == want["n"] and got["acc"] == want["acc"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def test_lambada_counts_a_greedy_target_as_correct(cfg, enc, layered):
    # Make the model always predict " the" (one token): a target of " the" is right, any other wrong.
    the = enc.encode_ordinary(" the")[0]
    rigged = {**layered, "lm_head": {**layered["lm_head"], "bias": layered["lm_head"]["bias"].at[the].set(100.0)}}
    got = score.lambada(rigged, cfg, ["over to the", "over to them"], enc)
    assert got["acc"] == 0.5


def test_token_scores_are_per_position_logprobs_and_alternatives(cfg, enc, text, log_probs, params, layered):
    seqs = [enc.encode_ordinary(text)[:40], [data.EOT, 464], enc.encode_ordinary(text)[5:30]]
    got = score.token_scores(layered, cfg, seqs, batch_size=2, k=3)
    for seq, s in zip(seqs, got):
        logp = log_probs(params, seq)
        assert s["logprob"].shape == (len(seq) - 1,) and s["top_ids"].shape == (len(seq) - 1, 3)
        assert np.allclose(s["logprob"], logp[np.arange(len(seq) - 1), seq[1:]], atol=1e-5)
        assert (s["top_ids"] == np.argsort(-logp[:-1], -1)[:, :3]).all()
        assert (s["greedy"] == (logp[:-1].argmax(-1) == seq[1:])).all()

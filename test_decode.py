"""decode.py: cached generation against full recomputation (rows at different positions, on one device and a
mesh, compiled loop and stepwise), the finish rule, penalties and logit bias, logprobs, sampling filters as
properties, and streamed text. The tiny model and its references are conftest.py's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import data
import decode
import sampling
import shard


def sampled_rows(prompts, seed=1, max_new=10):
    return [decode.Row(p, max_new, 1.0, 50, 0.9, (seed, i)) for i, p in enumerate(prompts)]


# ---------------------------------------------------------------- generation

def test_cached_batch_of_prompts_of_three_lengths_equals_recomputing_each(cfg, prompts, params, layered, reference):
    rows = [decode.Row(p, 10) for p in prompts]
    assert decode.complete(layered, cfg, rows) == reference
    assert decode.complete(params, cfg, rows) == reference  # stacked weights: gptj.forward itself


def test_sharded_generation_equals_unsharded(cfg, prompts, params, layered, mesh_params, reference):
    sharded, mesh = mesh_params
    assert decode.complete(sharded, cfg, [decode.Row(p, 10) for p in prompts], mesh=mesh) == reference
    # As train.py samples: stacked weights placed on a (dp, mp) mesh, one row padded to a batch dp divides.
    stacked, want = shard.place_params(params, mesh), decode.complete(layered, cfg, sampled_rows(prompts))
    assert decode.complete(stacked, cfg, sampled_rows(prompts), mesh=mesh) == want
    assert decode.complete(stacked, cfg, sampled_rows(prompts)[1:2], mesh=mesh) == want[1:2]


def test_stepwise_path_equals_compiled_loop(cfg, prompts, layered, mesh_params, reference):
    rows, each_step = [decode.Row(p, 10) for p in prompts], lambda *a: None
    assert decode.complete(layered, cfg, rows, on_step=each_step) == reference
    sampled = decode.complete(layered, cfg, sampled_rows(prompts))
    assert decode.complete(layered, cfg, sampled_rows(prompts), on_step=each_step) == sampled
    sharded, mesh = mesh_params
    assert decode.complete(sharded, cfg, rows, mesh=mesh, on_step=each_step) == reference


def test_rows_stop_at_eot_or_their_own_limit(cfg, prompts, recompute_greedy, params, layered, reference):
    eot = reference[0][2]  # pretend that the first row's 3rd token is <|endoftext|>
    rows = [decode.Row(p, n) for p, n in zip(prompts, (10, 4, 7))]
    want = [recompute_greedy(params, p, n, eot) for p, n in zip(prompts, (10, 4, 7))]
    assert want[0] == reference[0][:reference[0].index(eot)]
    assert decode.complete(layered, cfg, rows, eot=eot) == want
    assert decode.complete(layered, cfg, rows, eot=eot, on_step=lambda *a: None) == want


def test_on_step_can_stop_a_row(cfg, prompts, layered, reference):
    def stop_first_after_two(tok, new, done):
        stop_first_after_two.steps += 1
        if stop_first_after_two.steps == 2:
            done[0] = True
    stop_first_after_two.steps = 0
    got = decode.complete(layered, cfg, [decode.Row(p, 10) for p in prompts], on_step=stop_first_after_two)
    assert got == [reference[0][:2]] + reference[1:]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(cfg, prompts, layered):
    a, b = decode.complete(layered, cfg, sampled_rows(prompts)), decode.complete(layered, cfg, sampled_rows(prompts))
    assert a == b and a != decode.complete(layered, cfg, sampled_rows(prompts, seed=2))
    assert decode.complete(layered, cfg, sampled_rows(prompts)[1:2]) == a[1:2]


def test_generate_is_compiled_once_per_shape(cfg, layered):
    rows = [decode.Row([data.EOT] * n, 16) for n in (3, 1, 4, 2)]
    tokens, lengths, knobs, limit, steps = decode.pack(rows, n_vocab=cfg.n_vocab)
    kw = dict(mesh=None)  # as complete() passes it: a call signature of its own retraces
    decode.generate(layered, tokens, lengths, knobs, limit, cfg, steps, eot=data.EOT, **kw)
    before = decode.generate._cache_size()
    other = [decode.Row([7] * n, n, 0.5, 3, 0.5, (1, 2), 0.5, -1.0, {5: 3.0}) for n in (16, 2, 9, 1)]
    tokens, lengths, knobs, limit, steps = decode.pack(other, n_vocab=cfg.n_vocab)
    decode.generate(layered, tokens, lengths, knobs, limit, cfg, steps, eot=7, **kw)
    assert decode.generate._cache_size() == before  # new prompts, settings, limits, eot: no recompile


def test_prompt_beyond_the_context_or_vocabulary_is_refused(cfg, layered):
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        decode.complete(layered, cfg, [decode.Row(list(range(60)), 5)])
    for ids in ([-1, 3], [3, cfg.n_vocab]):
        with pytest.raises(ValueError, match=r"ids in \[0, 50304\)"):
            decode.complete(layered, cfg, [decode.Row(ids, 5)])


# ---------------------------------------------------------------- sampling filters

@jax.jit
def filtered(logits, top_k, top_p):
    return sampling.filter_logits(logits, top_k, top_p)


@st.composite
def logits_and_filters(draw):
    """[4, 24] logits from a coarse grid, so ties are common; 0 or more padding-like -inf entries."""
    values = st.one_of(st.integers(-40, 40).map(lambda v: v / 4), st.just(-np.inf))
    logits = np.array(draw(st.lists(values, min_size=96, max_size=96)), np.float32).reshape(4, 24)
    logits[:, 0] = np.maximum(logits[:, 0], -10)  # every row has a finite logit
    top_k = draw(st.lists(st.integers(0, 30), min_size=4, max_size=4))
    top_p = draw(st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4))
    return logits, np.array(top_k), np.array(top_p, np.float32)


@settings(max_examples=150)
@given(logits_and_filters())
def test_filter_keeps_argmax_mass_p_and_only_top_k(case):
    logits, top_k, top_p = case
    kept = np.isfinite(np.asarray(filtered(logits, top_k, top_p)))
    for row, keep, k, p in zip(logits, kept, top_k, top_p):
        assert keep[row.argmax()]
        kth = np.sort(row)[::-1][min(k, len(row)) - 1] if k else -np.inf
        assert (row[keep] >= kth).all()  # nothing outside the top k (ties with the k-th included)
        probs = np.exp(row - row.max()) * (row >= kth)
        mass = probs[keep].sum() / probs.sum()
        assert mass >= p - 1e-5
        # and the fewest such: without its smallest kept logits the mass would fall short of p
        assert keep.sum() == 1 or probs[keep & (row > row[keep].min())].sum() / probs.sum() < p + 1e-5


@settings(max_examples=25)
@given(st.integers(1, 16), st.floats(0.0, 3.0), st.integers(0, 20), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_padded_vocabulary_is_never_sampled(vocab, temperature, top_k, top_p, seed):
    # Padding ids get the largest logits, so any leak through the mask would show at once.
    logits = jnp.where(jnp.arange(24) < vocab, jax.random.normal(jax.random.key(seed), (4, 24)), 50.0)
    keys = np.stack([np.full(4, seed, np.uint32), np.arange(4, dtype=np.uint32)], 1)
    full = lambda x: jnp.full(4, x)
    tokens = sampled_token(logits, keys, full(temperature), full(top_k), full(top_p), vocab)
    assert (np.asarray(tokens) < vocab).all()


@jax.jit
def sampled_token(logits, keys, temperature, top_k, top_p, vocab, presence=0.0, frequency=0.0, bias=None, counts=None):
    B, V = logits.shape
    full = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (B,))
    knobs = {"key": keys, "temperature": temperature, "top_k": top_k, "top_p": top_p, "presence": full(presence),
             "frequency": full(frequency), "biased": jnp.full(B, bias is not None),
             "bias": jnp.zeros((B, V)) if bias is None else bias}
    counts = jnp.zeros((B, V), jnp.int32) if counts is None else counts
    return sampling.sample_logits(logits, knobs, jnp.full(B, 3), counts, vocab)


def test_extreme_settings_stay_in_the_vocabulary():
    """An infinite temperature draws uniformly from the real vocabulary (-inf / inf must not become NaN), and
    a top_k beyond int32 keeps everything."""
    logits = jnp.where(jnp.arange(24) < 5, jax.random.normal(jax.random.key(0), (4, 24)), 50.0)
    keys = np.stack([np.arange(4, dtype=np.uint32), np.arange(4, dtype=np.uint32)], 1)
    for top_p in (1.0, 0.5):
        tokens = sampled_token(logits, keys, jnp.full(4, jnp.inf), jnp.zeros(4, jnp.int32), jnp.full(4, top_p), 5)
        assert (np.asarray(tokens) < 5).all()
    assert decode.knobs([decode.Row([1], 1, 1.0, 2**40, 1.0)], 8)["top_k"][0] == 2**31 - 1


def test_a_tiny_temperature_is_the_argmax():
    """(logit - max) / t, not logit / t - max: at t = 2e-38 the latter is inf - inf."""
    logits = jax.random.normal(jax.random.key(5), (4, 24)) * 30
    keys = np.stack([np.arange(4, dtype=np.uint32)] * 2, 1)
    for t in (2e-38, 1e-30, 1e-6):
        got = sampled_token(logits, keys, jnp.full(4, t), jnp.zeros(4, jnp.int32), jnp.ones(4), 24)
        assert (np.asarray(got) == np.asarray(logits.argmax(-1))).all(), t


def test_sampling_follows_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = np.stack([np.zeros(4000, np.uint32), np.arange(4000, dtype=np.uint32)], 1)
    ones = jnp.ones(4000)
    counts = lambda t: np.bincount(np.asarray(t), minlength=4) / 4000
    assert np.allclose(counts(sampled_token(logits, keys, ones, 0 * ones, ones, 4)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = [0.625, 0.375, 0, 0]
    assert np.allclose(counts(sampled_token(logits, keys, ones, 2 + 0 * ones, ones, 4)), top2, atol=0.03)
    assert np.allclose(counts(sampled_token(logits, keys, ones, 0 * ones, 0.7 * ones, 4)), top2, atol=0.03)
    assert (counts(sampled_token(logits, keys, 0 * ones, 0 * ones, ones, 4)) == [1, 0, 0, 0]).all()


def test_text_holds_back_stop_prefixes_and_split_characters(enc):
    ids = enc.encode("Hello wörld 😀 and so on. The end")
    text, deltas = decode.Text(enc, ["so on", "XYZ"]), []
    for t in ids:
        deltas.append(text.add(t))
        assert "\ufffd" not in deltas[-1] and not "".join(deltas).endswith(" so")
    deltas.append(text.flush())
    assert text.stopped and "".join(deltas) == text.text == "Hello wörld 😀 and "


@settings(max_examples=200)
@given(st.lists(st.integers(0, decode.VOCAB - 2), max_size=12), st.lists(st.text(max_size=3), max_size=2))
def test_streamed_text_adds_up_to_the_decoded_tokens(enc, ids, stops):
    text = decode.Text(enc, stops)
    shown = "".join(text.add(t) for t in ids) + text.flush()
    whole = enc.decode(ids)
    cut = min([whole.find(s) for s in stops if s and s in whole], default=len(whole))
    assert shown == text.text == whole[:cut] and text.stopped == (cut < len(whole))


# ---------------------------------------------------------------- penalties, logit bias, logprobs, the finish rule

def test_penalties_and_logit_bias_as_openai_defines_them(cfg, prompts, recompute_greedy, params, layered):
    """Greedy decoding with OpenAI's adjustments equals recomputing with them applied in numpy, on the compiled
    loop and the stepwise path alike; a row without them in the same batch is unchanged."""
    settings_ = [dict(frequency=1.5), dict(presence=2.0), dict(presence=-1.0, frequency=0.5),
                 dict(bias={prompts[0][0]: 100.0}), dict(bias={t: -100.0 for t in recompute_greedy(params, prompts[1], 3)})]
    for kw in settings_:
        rows = [decode.Row(prompts[1], 10, **kw), decode.Row(prompts[0], 10)]
        want = [recompute_greedy(params, prompts[1], 10, **kw), recompute_greedy(params, prompts[0], 10)]
        assert decode.complete(layered, cfg, rows) == want, kw
        assert decode.complete(layered, cfg, rows, on_step=lambda *a: None) == want, kw
    assert decode.complete(layered, cfg, [decode.Row(prompts[0], 4, bias={prompts[0][0]: 100.0})]) == [[464] * 4]


def test_sampled_penalties_follow_the_shifted_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = np.stack([np.zeros(4000, np.uint32), np.arange(4000, dtype=np.uint32)], 1)
    ones = jnp.ones(4000)
    counts = jnp.zeros((4000, 4), jnp.int32).at[:, 0].set(2)  # token 0 generated twice so far
    freq = np.bincount(np.asarray(sampled_token(logits, keys, ones, 0 * ones, ones, 4, 0.25, 0.5, None, counts)), minlength=4)
    want = np.array([0.5, 0.3, 0.15, 0.05]) * np.exp([-1.25, 0, 0, 0])
    assert np.allclose(freq / 4000, want / want.sum(), atol=0.03)


def test_logprobs_are_the_models_own_and_ties_compare_equal():
    logits = jax.random.normal(jax.random.key(3), (5, 7, 300)) * 4
    targets = jnp.asarray(np.random.default_rng(0).integers(0, 300, (5, 7)))
    got = jax.jit(sampling.token_logprobs, static_argnums=2)(logits, targets, 5)
    want = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits))
    assert np.allclose(got["logprob"], np.take_along_axis(want, np.asarray(targets)[..., None], -1)[..., 0], atol=1e-5)
    assert (np.asarray(got["top_ids"]) == np.argsort(-want, -1)[..., :5]).all()
    greedy = jax.jit(sampling.token_logprobs, static_argnums=2)(logits, logits.argmax(-1), 1)
    assert (greedy["logprob"] == greedy["top_logprobs"][..., 0]).all()  # lm-evaluation-harness tests greedy by ==


def test_every_token_has_a_distinct_stable_name(cfg, enc):
    names = [decode.token_name(enc, t) for t in range(cfg.n_vocab)]
    assert len(set(names)) == cfg.n_vocab
    assert names[data.EOT] == "<|endoftext|>" and names[464] == "The" and names[50300] == "<|padding:50300|>"
    partial = [t for t in range(enc.n_vocab) if names[t].startswith("bytes:")]
    assert 300 < len(partial) < 400 and names[447] == "bytes:\\xe2\\x80"


def test_one_finish_rule_for_jax_and_numpy():
    rng = np.random.default_rng(0)
    tok, n = rng.integers(0, 4, 64).astype(np.int32), rng.integers(0, 5, 64).astype(np.int32)
    done, limit = rng.random(64) < 0.3, rng.integers(1, 6, 64).astype(np.int32)
    got = jax.jit(decode.finish)(tok, n, done, limit, 2)
    want = decode.finish(tok, n, done, limit, 2)
    assert all((np.asarray(g) == w).all() for g, w in zip(got, want))
    new, n2, done2 = want
    assert (new == (~done & (tok != 2))).all() and (done2 == (done | (tok == 2) | (n2 >= limit))).all()


@settings(max_examples=50)
@given(st.lists(st.integers(-3, 3), min_size=8 * 96, max_size=8 * 96))
def test_two_level_argmax_is_jnp_argmax(values):
    """Ties are common on this coarse grid: the first index of the maximum, as jnp.argmax."""
    x = jnp.asarray(np.array(values, np.float32).reshape(8, 96))
    assert (np.asarray(jax.jit(sampling.argmax)(x)) == np.asarray(jnp.argmax(x, -1))).all()


def test_inverse_transform_draws_never_pick_a_zero_weight_and_follow_the_weights():
    rng = np.random.default_rng(0)
    w = rng.random((4, 1000)).astype(np.float32) * (rng.random((4, 1000)) < 0.3)  # most weights 0
    w[:, -1] = 0  # the top end is 0: rounding must not land there
    draw = jax.jit(lambda w, u, chunk: sampling.draw_index(jnp.log(w), u, chunk), static_argnums=2)
    edges = np.array([[0, 0], [1 - 2**-24, 1 - 2**-24], [0.5, 1 - 2**-24], [1 - 2**-24, 0]], np.float32)
    for chunk in (256, 16):
        got = np.asarray(draw(jnp.asarray(w), jnp.asarray(edges), chunk))
        assert (w[np.arange(4), got] > 0).all()
    u = jax.random.uniform(jax.random.key(1), (50_000, 2))
    picks = np.asarray(draw(jnp.broadcast_to(jnp.asarray(w[0]), (50_000, 1000)), u, 256))
    freq = np.bincount(picks, minlength=1000) / len(picks)
    assert np.abs(freq - w[0] / w[0].sum()).max() < 0.004 and (freq[w[0] == 0] == 0).all()


# ---------------------------------------------------------------- several tokens per compiled call

def test_several_tokens_per_call_equal_one_token_per_call(cfg, prompts, layered, monkeypatch):
    """decode.complete's streaming path, a few steps per compiled call (decode.Pace), against one step per call:
    the same tokens, and the same on_step calls, for sampled rows with their own seeds, penalties and limits, for
    a row that an end-of-text token ends mid-call, and for a row that on_step stops mid-call."""
    calls, real_step = [], decode.step
    monkeypatch.setattr(decode, "step", lambda *a, **kw: calls.append(int(a[3])) or real_step(*a, **kw))
    rows = [decode.Row(p, n, 1.0, 50, 0.9, (3, i), 0.5, 0.25) for i, (p, n) in enumerate(zip(prompts, (12, 3, 9)))]

    def run(chunk, eot=data.EOT, stop_after=None):
        seen = []

        def on_step(tok, new, done):
            seen.append((tok[new].tolist(), new.tolist(), done.tolist()))
            if len(seen) == stop_after:
                done[2] = True
        return decode.complete(layered, cfg, rows, on_step=on_step, eot=eot, chunk=chunk), seen

    one, seen = run(1)
    assert calls and max(calls) == 1 and one == decode.complete(layered, cfg, rows)  # and the compiled loop's
    calls.clear()
    assert run(decode.CHUNK) == (one, seen) and max(calls) > 1, calls
    eot = one[0][5]  # pretend that row 0's 6th token ends its text
    assert run(decode.CHUNK, eot) == run(1, eot) and run(1, eot)[0][0] == one[0][:one[0].index(eot)]
    assert run(decode.CHUNK, stop_after=4) == run(1, stop_after=4)
    assert len(run(1, stop_after=4)[0][2]) == 4

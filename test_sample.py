"""decode.py and sample.py: cached generation against full recomputation, sampling filters as properties,
scoring against a direct computation, the CLI, and the HTTP server end to end on loopback."""
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ckpt
import data
import decode
import gptj
import sample
import shard

CFG = gptj.Config(n_vocab=50304, n_ctx=64, d_model=32, n_layer=2, n_head=4, rotary_dim=4)
ENC = data.tokenizer()
EOT = data.EOT
PROMPTS = [[464, 2068, 7586], [40, 716, 257, 1310, 5509, 286, 1110, 13], [50256]]  # three lengths
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
        "To die, to sleep, no more; and by a sleep to say we end the heart-ache and the thousand natural shocks "
        "that flesh is heir to: 'tis a consummation devoutly to be wished.") * 2


@pytest.fixture(scope="module")
def params():
    return gptj.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def layered(params):
    """Per-layer weights, as the command line and the server use them."""
    return decode.unstack(params)


@pytest.fixture(scope="module")
def mesh_params(params):
    mesh = shard.make_mesh(2, 2)
    return decode.unstack(shard.place_params(params, mesh)), mesh


@jax.jit
def _full_forward(params, tokens):
    return jax.nn.log_softmax(gptj.forward(params, tokens, CFG)[0][0])


def log_probs(params, ids):
    """Log-probabilities [len(ids), n_vocab] from one full forward without a cache. The ids are right-padded
    to the context, which cannot change the earlier positions (causal), so this compiles once."""
    return _full_forward(params, jnp.array([list(ids) + [0] * (CFG.n_ctx - len(ids))]))[:len(ids)]


def recompute_greedy(params, ids, n, eot=None):
    """The slow, obviously right way: a full forward over the whole sequence, no cache, for every token."""
    ids, out = list(ids), []
    for _ in range(n):
        token = int(jnp.argmax(log_probs(params, ids)[-1, :decode.VOCAB]))
        if token == eot:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def reference(params):
    return [recompute_greedy(params, p, 10) for p in PROMPTS]


def sampled_rows(seed=1, max_new=10):
    return [decode.Row(p, max_new, 1.0, 50, 0.9, (seed, i)) for i, p in enumerate(PROMPTS)]


# ---------------------------------------------------------------- generation

def test_cached_left_padded_batch_equals_recomputing_each_prompt(params, layered, reference):
    rows = [decode.Row(p, 10) for p in PROMPTS]
    assert decode.complete(layered, CFG, rows) == reference
    assert decode.complete(params, CFG, rows) == reference  # stacked weights: gptj.forward itself


def test_sharded_generation_equals_unsharded(params, layered, mesh_params, reference):
    sharded, mesh = mesh_params
    assert decode.complete(sharded, CFG, [decode.Row(p, 10) for p in PROMPTS], mesh=mesh) == reference
    # As train.py samples: stacked weights placed on a (dp, mp) mesh, one row padded to a batch dp divides.
    stacked, want = shard.place_params(params, mesh), decode.complete(layered, CFG, sampled_rows())
    assert decode.complete(stacked, CFG, sampled_rows(), mesh=mesh) == want
    assert decode.complete(stacked, CFG, sampled_rows()[1:2], mesh=mesh) == want[1:2]


def test_stepwise_path_equals_compiled_loop(layered, mesh_params, reference):
    rows, each_step = [decode.Row(p, 10) for p in PROMPTS], lambda *a: None
    assert decode.complete(layered, CFG, rows, on_step=each_step) == reference
    sampled = decode.complete(layered, CFG, sampled_rows())
    assert decode.complete(layered, CFG, sampled_rows(), on_step=each_step) == sampled
    sharded, mesh = mesh_params
    assert decode.complete(sharded, CFG, rows, mesh=mesh, on_step=each_step) == reference


def test_rows_stop_at_eot_or_their_own_limit(params, layered, reference):
    eot = reference[0][2]  # pretend that the first row's 3rd token is <|endoftext|>
    rows = [decode.Row(p, n) for p, n in zip(PROMPTS, (10, 4, 7))]
    want = [recompute_greedy(params, p, n, eot) for p, n in zip(PROMPTS, (10, 4, 7))]
    assert want[0] == reference[0][:reference[0].index(eot)]
    assert decode.complete(layered, CFG, rows, eot=eot) == want
    assert decode.complete(layered, CFG, rows, eot=eot, on_step=lambda *a: None) == want


def test_on_step_can_stop_a_row(layered, reference):
    def stop_first_after_two(tok, new, done):
        stop_first_after_two.steps += 1
        if stop_first_after_two.steps == 2:
            done[0] = True
    stop_first_after_two.steps = 0
    got = decode.complete(layered, CFG, [decode.Row(p, 10) for p in PROMPTS], on_step=stop_first_after_two)
    assert got == [reference[0][:2]] + reference[1:]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(layered):
    a, b = decode.complete(layered, CFG, sampled_rows()), decode.complete(layered, CFG, sampled_rows())
    assert a == b and a != decode.complete(layered, CFG, sampled_rows(seed=2))
    assert decode.complete(layered, CFG, sampled_rows()[1:2]) == a[1:2]


def test_generate_is_compiled_once_per_shape(layered):
    tokens, start = np.full((4, 16), EOT, np.int32), np.array([13, 15, 12, 14], np.int32)
    keys, temperature, top_k, top_p = (np.zeros((4, 2), np.uint32), np.ones(4, np.float32), np.zeros(4, np.int32),
                                       np.ones(4, np.float32))
    kw = dict(mesh=None)  # as complete() passes it: a call signature of its own retraces
    decode.generate(layered, tokens, start, (keys, temperature, top_k, top_p), np.full(4, 16, np.int32), CFG, 16,
                    eot=EOT, **kw)
    before = decode.generate._cache_size()
    knobs = (keys + 1, temperature * 0.5, top_k + 3, top_p * 0.5)
    decode.generate(layered, tokens + 1, start - 1, knobs, np.arange(1, 5, dtype=np.int32), CFG, 16, eot=7, **kw)
    assert decode.generate._cache_size() == before  # new prompts, settings, limits, eot: no recompile


def test_prompt_beyond_the_context_or_vocabulary_is_refused(layered):
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        decode.complete(layered, CFG, [decode.Row(list(range(60)), 5)])
    for ids in ([-1, 3], [3, CFG.n_vocab]):
        with pytest.raises(ValueError, match=r"ids in \[0, 50304\)"):
            decode.complete(layered, CFG, [decode.Row(ids, 5)])


# ---------------------------------------------------------------- sampling filters

@jax.jit
def filtered(logits, top_k, top_p):
    return decode.filter_logits(logits, top_k, top_p)


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
def sampled_token(logits, keys, temperature, top_k, top_p, vocab):
    return decode.sample_logits(logits, keys, 3, temperature, top_k, top_p, vocab)


def test_extreme_settings_stay_in_the_vocabulary():
    """An infinite temperature draws uniformly from the real vocabulary (-inf / inf must not become NaN), and
    a top_k beyond int32 keeps everything."""
    logits = jnp.where(jnp.arange(24) < 5, jax.random.normal(jax.random.key(0), (4, 24)), 50.0)
    keys = np.stack([np.arange(4, dtype=np.uint32), np.arange(4, dtype=np.uint32)], 1)
    for top_p in (1.0, 0.5):
        tokens = sampled_token(logits, keys, jnp.full(4, jnp.inf), jnp.zeros(4, jnp.int32), jnp.full(4, top_p), 5)
        assert (np.asarray(tokens) < 5).all()
    knobs = decode.pack([decode.Row([1], 1, 1.0, 2**40, 1.0)])[2]
    assert knobs[2][0] == 2**31 - 1


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


def test_text_holds_back_stop_prefixes_and_split_characters():
    ids = ENC.encode("Hello wörld 😀 and so on. The end")
    text, deltas = decode.Text(ENC, ["so on", "XYZ"]), []
    for t in ids:
        deltas.append(text.add(t))
        assert "\ufffd" not in deltas[-1] and not "".join(deltas).endswith(" so")
    deltas.append(text.flush())
    assert text.stopped and "".join(deltas) == text.text == "Hello wörld 😀 and "


@settings(max_examples=200)
@given(st.lists(st.integers(0, decode.VOCAB - 2), max_size=12), st.lists(st.text(max_size=3), max_size=2))
def test_streamed_text_adds_up_to_the_decoded_tokens(ids, stops):
    text = decode.Text(ENC, stops)
    shown = "".join(text.add(t) for t in ids) + text.flush()
    whole = ENC.decode(ids)
    cut = min([whole.find(s) for s in stops if s and s in whole], default=len(whole))
    assert shown == text.text == whole[:cut] and text.stopped == (cut < len(whole))


# ---------------------------------------------------------------- scoring

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
        rows = sample.rolling_windows(tokens, 64)
        predicted = [t for seq, n in rows for t in seq[-n:]]
        assert predicted == tokens and all(len(seq) <= 65 for seq, _ in rows)


def test_score_equals_direct_computation(params, layered, mesh_params):
    tokens = ENC.encode_ordinary(TEXT)
    assert 128 < len(tokens) < 192  # three windows, the last one partial
    got = sample.score_text(layered, CFG, TEXT, ENC, batch_size=8)
    assert got["tokens"] == len(tokens) and got["ppl"] == pytest.approx(math.exp(got["nll"]))
    assert got["nll"] == pytest.approx(direct_nll(params, tokens), rel=1e-5)
    assert sample.score_text(params, CFG, TEXT, ENC, batch_size=8)["nll"] == pytest.approx(got["nll"], rel=1e-6)
    sharded, mesh = mesh_params
    assert sample.score_text(sharded, CFG, TEXT, ENC, mesh=mesh)["nll"] == pytest.approx(got["nll"], rel=1e-5)


LAMBADA = [TEXT[:60], TEXT[:200], TEXT, "word", TEXT[100:170]]


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
    got = sample.lambada(layered, CFG, LAMBADA, ENC, batch_size=2)  # several batches
    assert got["n"] == want["n"] and got["acc"] == want["acc"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def test_lambada_counts_a_greedy_target_as_correct(layered):
    # Make the model always predict " the" (one token): a target of " the" is right, any other wrong.
    the = ENC.encode_ordinary(" the")[0]
    rigged = {**layered, "lm_head": {**layered["lm_head"], "bias": layered["lm_head"]["bias"].at[the].set(100.0)}}
    got = sample.lambada(rigged, CFG, ["over to the", "over to them"], ENC)
    assert got["acc"] == 0.5


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def checkpoint(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    ckpt.save(path, {"params": params}, CFG)
    return str(path)


def cli(capsys, *argv, stdin=None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = sample.main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_in_prompt_order(capsys, checkpoint, params, reference):
    texts = [ENC.decode(p) for p in PROMPTS]
    argv = ["--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--json"]
    code, out, _ = cli(capsys, *argv, *[a for t in texts for a in ("--prompt", t)])
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [x["prompt"] for x in lines] == texts
    assert [x["completion_ids"] for x in lines] == reference
    assert [x["completion"] for x in lines] == [ENC.decode(r) for r in reference]
    code, out, _ = cli(capsys, *argv, "--mesh", "2,2", "--num_samples", "3", "--prompt", texts[0])
    assert [json.loads(x)["completion_ids"] for x in out.splitlines()] == [reference[0]] * 3


def test_cli_streams_one_sample_and_reads_stdin(capsys, checkpoint, reference):
    prompt = ENC.decode(PROMPTS[1])
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--prompt", prompt)
    assert code == 0 and out == prompt + ENC.decode(reference[1]) + "\n"
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--json",
                       stdin=f"{prompt}\n\n{ENC.decode(PROMPTS[0])}\n")
    assert [json.loads(x)["completion_ids"] for x in out.splitlines()] == [reference[1], reference[0]]


def test_cli_score_and_lambada(capsys, checkpoint, params, layered, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--score", str(tmp_path / "t.txt"), "--batch_size", "8")
    want = sample.score_text(layered, CFG, TEXT, ENC)
    assert code == 0 and json.loads(out)["nll"] == pytest.approx(want["nll"], rel=1e-6)
    argv = ["--checkpoint", checkpoint, "--lambada", str(tmp_path / "l.jsonl"), "--mesh", "2,2", "--batch_size", "8"]
    code, out, _ = cli(capsys, *argv)
    got, want = json.loads(out), direct_lambada(params, LAMBADA)
    assert code == 0 and got["acc"] == want["acc"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent", "--prompt", "x"], "no such checkpoint"),
    (["--mesh", "a,b", "--prompt", "x"], "must be DP,MP"),
    (["--mesh", "1,3", "--prompt", "x"], "not divisible by mp=3"),
    (["--prompt", "x " * 70], "exceeds the context of 64"),
    (["--top_p", "0", "--prompt", "x"], "--top_p"),
])
def test_cli_errors_are_one_line(capsys, checkpoint, argv, message):
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", checkpoint] + argv
    code, out, err = cli(capsys, *argv)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_bad_prompt_files_and_port(capsys, checkpoint, tmp_path):
    (tmp_path / "keyless.jsonl").write_text('{"foo": 1}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    for argv, message in [(["--prompt_file", str(tmp_path / "keyless.jsonl")], "string 'prompt'"),
                          (["--prompt_file", str(tmp_path / "empty.jsonl")], "no prompts"),
                          (["--serve", "--port", "70000"], "--port must be in 0..65535")]:
        code, out, err = cli(capsys, "--checkpoint", checkpoint, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_without_checkpoint_says_how_to_make_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "--prompt", "x")
    assert code == 1 and "python train.py" in err


def test_benchmark_reports_speed_and_the_bound(layered):
    got = sample.benchmark(layered, CFG, 2, 8)
    assert got["weights_bytes"] == sum(x.nbytes for x in jax.tree.leaves(layered)) - layered["wte"].nbytes
    assert all(got[k] > 0 for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s",
                                    "compile_s", "bandwidth_bytes_per_s", "decode_bound_tokens_per_s",
                                    "loop_ms_per_token", "stream_ms_per_token"))
    with pytest.raises(ValueError, match="64 new tokens leave no room for a prompt in the context of 64"):
        sample.benchmark(layered, CFG, 2, 64)


# ---------------------------------------------------------------- server

@pytest.fixture(scope="module")
def server(layered):
    server = sample.serve(layered, CFG, "127.0.0.1", 0, max_batch=8)
    yield server
    server.close()


def post(server, body, raw=False):
    """-> (status, parsed JSON answer); raw: (status, the SSE data payloads)."""
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    data_ = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data_), timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if raw:
        return status, [line[len("data: "):] for line in text.split("\n\n") if line]
    return status, json.loads(text)


def test_health(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/health", timeout=10) as r:
        assert r.status == 200 and json.load(r) == {"status": "ok"}


def test_completion_matches_generation(server, reference):
    status, got = post(server, {"prompt": ENC.decode(PROMPTS[0]), "max_tokens": 10, "temperature": 0})
    assert status == 200 and got["object"] == "text_completion"
    choice = {"text": ENC.decode(reference[0]), "index": 0, "logprobs": None, "finish_reason": "length"}
    assert got["choices"] == [choice]
    assert got["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}


def test_concurrent_requests_share_a_batch(server, reference):
    server.batch_wait, batches = 1.0, len(server.batches)
    results = [None] * len(PROMPTS)

    def ask(i):
        results[i] = post(server, {"prompt": ENC.decode(PROMPTS[i]), "max_tokens": 10, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.batch_wait = 0.005
    assert [r[1]["choices"][0]["text"] for r in results] == [ENC.decode(r) for r in reference]
    assert server.batches[batches:] == [3]


def test_streaming_sends_the_same_text(server, reference):
    body = {"prompt": [ENC.decode(p) for p in PROMPTS], "max_tokens": 10, "temperature": 0, "stream": True}
    status, events = post(server, body, raw=True)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    for i in range(len(PROMPTS)):
        mine = [c for c in chunks if c["index"] == i]
        assert "".join(c["text"] for c in mine) == ENC.decode(reference[i])
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]


def test_stop_strings_n_and_seeds(server, reference):
    fulls = [ENC.decode(r) for r in reference]
    stop = fulls[1][len(fulls[1]) // 2:len(fulls[1]) // 2 + 3]
    want = [(f[:f.index(stop)], "stop") if stop in f else (f, "length") for f in fulls]
    for stream in (False, True):
        body = {"prompt": [ENC.decode(p) for p in PROMPTS], "max_tokens": 10, "temperature": 0, "stop": stop,
                "stream": stream}
        status, got = post(server, body, raw=stream)
        if stream:  # reassemble the choices from the chunks
            chunks = [json.loads(e)["choices"][0] for e in got[:-1]]
            got = {"choices": [{"text": "".join(c["text"] for c in chunks if c["index"] == i),
                                "finish_reason": [c for c in chunks if c["index"] == i][-1]["finish_reason"]}
                               for i in range(len(PROMPTS))]}
        assert [(c["text"], c["finish_reason"]) for c in got["choices"]] == want
    body = {"prompt": ["Once upon", "a time"], "n": 2, "max_tokens": 6, "temperature": 1.0, "top_k": 40, "seed": 7}
    status, first = post(server, body)
    assert status == 200 and [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert post(server, body)[1]["choices"] == first["choices"]
    assert first["choices"][0]["text"] != first["choices"][1]["text"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "malformed JSON"),
    (b"[" * 100_000, "malformed JSON"),  # too deep for the parser
    ({"max_tokens": 4}, "'prompt'"),
    ({"prompt": 5}, "'prompt'"),
    ({"prompt": []}, "'prompt'"),
    ({"prompt": "x", "max_tokens": "5"}, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens'"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature'"),
    ({"prompt": "x", "top_p": 0}, "'top_p'"),
    ({"prompt": "x", "n": 0}, "'n'"),
    ({"prompt": "x", "stop": 3}, "'stop'"),
    ({"prompt": "x", "stream": "yes"}, "'stream'"),
    ({"prompt": "x " * 60, "max_tokens": 10}, "exceeds the context"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, message):
    status, got = post(server, body)
    assert status == 400 and message in got["error"]
    assert post(server, {"prompt": "x", "max_tokens": 1})[0] == 200


def test_extreme_settings_and_bad_lengths(server):
    for extreme in ({"top_k": 3_000_000_000}, {"temperature": 1e300}):  # 1e300 is inf in float32
        status, got = post(server, {"prompt": "x", "max_tokens": 3, "seed": 1, **extreme})
        assert status == 200 and got["choices"][0]["finish_reason"] in ("stop", "length")
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        reply = b"".join(iter(lambda: s.recv(4096), b"")).decode()  # HTTP/1.0: read until the server closes
    assert reply.startswith("HTTP/1.0 400") and "Content-Length -1 is negative" in reply


def test_close_finishes_requests_in_flight(layered):
    server = sample.serve(layered, CFG, "127.0.0.1", 0)
    result = []
    body = {"prompt": "Hi", "max_tokens": 16, "stream": True}
    asker = threading.Thread(target=lambda: result.append(post(server, body, raw=True)))
    asker.start()
    deadline = time.monotonic() + 30
    while not server.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()
    asker.join(30)
    assert result and result[0][0] == 200 and result[0][1][-1] == "[DONE]"
    with pytest.raises(OSError):
        post(server, {"prompt": "x"})


def test_sigterm_stops_the_cli_server(checkpoint):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", checkpoint, "--serve", "--port", "0"],
                            cwd=os.path.dirname(os.path.abspath(__file__)), env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving http://127.0.0.1:" in line
        port = int(line.split(":")[2].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()

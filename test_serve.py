"""serve.py end to end on loopback: OpenAI's completions API against in-process decoding and scoring, the
`openai` client, lm-evaluation-harness's request shapes, continuous batching, cancellation and bad input.

Which requests share a batch is never left to the clock: tests of continuous batching hold the model thread before
its steps (conftest.py's `steps`) and let it go one step at a time until the server's own state is what they need."""
import dataclasses
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

import data
import decode
import score
import serve


@pytest.fixture(scope="module")
def server(cfg, layered):
    server = serve.serve(layered, cfg, "127.0.0.1", 0, slots=8, model_name="tiny")
    yield server
    server.close()


def url(server, path="/v1/completions"):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture(scope="session")
def get(patience):
    def get(server, path):
        with urllib.request.urlopen(url(server, path), timeout=patience) as r:
            return r.status, json.load(r)
    return get


@pytest.fixture(scope="session")
def raw_reply(patience):
    """raw_reply(server, request bytes) -> the reply, read until the server closes the connection (HTTP/1.0)."""
    def raw_reply(server, request):
        deadline = time.monotonic() + patience
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=patience) as s:
            s.sendall(request)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
                assert time.monotonic() < deadline, f"the server was still sending after {patience:.0f} s"
        return reply.decode()
    return raw_reply


def chunks_of(events):
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed(events, n):
    """The choices a stream adds up to: text, finish_reason and the logprobs lists joined."""
    choices = [c for e in chunks_of(events) for c in e["choices"]]
    out = []
    for i in range(n):
        mine = [c for c in choices if c["index"] == i]
        lp = [c["logprobs"] for c in mine if c["logprobs"]]
        out.append({"text": "".join(c["text"] for c in mine), "finish_reason": mine[-1]["finish_reason"],
                    "logprobs": {k: sum((x[k] for x in lp), []) for k in lp[0]} if lp else None})
        assert all(c["finish_reason"] is None for c in mine[:-1])
    return out


def decoding(server, **row):
    """The choices in the server's batch still generating, those whose decode.Row has these fields."""
    return [c for c in server.engine.rows if c is not None and not c.done and
            all(getattr(c.row, k) == v for k, v in row.items())]


# ---------------------------------------------------------------- the API

def test_health_models_and_tokenizer(server, post, get, enc):
    assert get(server, "/health") == (200, {"status": "ok"})
    status, models = get(server, "/v1/models")
    assert status == 200 and [(m["id"], m["max_model_len"], m["object"]) for m in models["data"]] == [("tiny", 64, "model")]
    status, info = get(server, "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|endoftext|>"
    text = "Hello, wörld<|endoftext|>"
    status, got = post(server, {"prompt": text, "add_special_tokens": False}, path="/tokenize")
    assert status == 200 and got["tokens"] == enc.encode(text, allowed_special="all") and got["tokens"][-1] == data.EOT
    assert post(server, {"tokens": got["tokens"]}, path="/detokenize") == (200, {"prompt": text})
    assert post(server, {"tokens": [-1]}, path="/detokenize")[0] == 400


def test_completion_matches_generation(server, post, enc, prompts, reference):
    status, got = post(server, {"prompt": enc.decode(prompts[0]), "max_tokens": 10, "temperature": 0, "model": "x"})
    assert status == 200 and got["object"] == "text_completion" and got["model"] == "tiny"
    choice = {"text": enc.decode(reference[0]), "index": 0, "logprobs": None, "finish_reason": "length"}
    assert got["choices"] == [choice]
    assert got["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
    # All four prompt forms; token ids are taken as they are.
    for prompt in (prompts[1], [prompts[1], prompts[0]], [enc.decode(prompts[1]), enc.decode(prompts[0])]):
        status, got = post(server, {"prompt": prompt, "max_tokens": 10, "temperature": 0})
        assert [c["text"] for c in got["choices"]] == [enc.decode(r) for r in (reference[1], reference[0])][
            :len(got["choices"])]


def test_echo_and_logprobs_are_the_models_own(server, post, enc, text, recompute_greedy, log_probs, params):
    ids = enc.encode_ordinary(text)[:20]
    body = {"prompt": [ids], "echo": True, "logprobs": 3, "max_tokens": 5, "temperature": 0}
    status, got = post(server, body)
    choice, want = got["choices"][0], recompute_greedy(params, ids, 5)
    lp = choice["logprobs"]
    assert status == 200 and choice["text"] == enc.decode(ids + want)
    assert lp["tokens"] == [decode.token_name(enc, t) for t in ids + want]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # Against the float64 log-softmax of one full forward (log_probs), not score.token_scores, which the server
    # itself calls for the echoed prompt: the prompt's and the generated tokens' logprobs alike.
    seq = ids + want
    ref = log_probs(params, seq)[:-1]  # row i: the distribution of token i + 1
    assert np.allclose(lp["token_logprobs"][1:], ref[np.arange(len(seq) - 1), seq[1:]], atol=2e-5)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        # The 3 likeliest and the chosen token, each with its own logprob; compared by value, so that two
        # alternatives within float32's rounding of each other may come in either order.
        near = {decode.token_name(enc, int(t)): ref[i, t] for t in [*np.argsort(-ref[i])[:8], seq[i + 1]]}
        assert len(top) <= 4 and set(top) <= set(near), i
        assert np.allclose([top[n] for n in top], [near[n] for n in top], atol=2e-5), i
        assert np.allclose(sorted(top.values(), reverse=True)[:3], np.sort(ref[i])[::-1][:3], atol=2e-5), i
    # Greedy: each generated token is the likeliest, with the same float.
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][20:], lp["top_logprobs"][20:]))
    offsets = [len(enc.decode((ids + want)[:i])) for i in range(25)]
    assert lp["text_offset"] == offsets
    # Streamed, the same choice arrives in pieces.
    status, events = post(server, {**body, "stream": True}, raw=True)
    assert streamed(events, 1)[0] == {"text": choice["text"], "finish_reason": "length", "logprobs": lp}
    # max_tokens 0 with echo scores a text without generating; logprobs 0 gives the chosen token alone.
    status, got = post(server, {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert status == 200 and got["usage"]["completion_tokens"] == 0 and got["choices"][0]["text"] == enc.decode(ids)
    tops = got["choices"][0]["logprobs"]["top_logprobs"]
    assert all(list(top) == [decode.token_name(enc, t)] for top, t in zip(tops[1:], ids[1:]))
    for echo in (True, False):  # streamed, max_tokens 0 still ends with a finish_reason
        status, events = post(server, {"prompt": ids, "echo": echo, "max_tokens": 0, "stream": True}, raw=True)
        assert streamed(events, 1)[0]["finish_reason"] == "length"


def test_lm_evaluation_harness_requests(server, post, cfg, enc, prompts, text, lambada_texts, recompute_greedy, params,
                                        layered):
    """The requests lm-evaluation-harness's local-completions model sends, read the way it reads them
    (parse_logprobs: token_logprobs[ctxlen:-1], greedy when each equals its top_logprobs' maximum)."""
    # Its max_length leaves a token for the one it generates: prompts of up to n_ctx - 1 tokens.
    rows = [score.lambada_row(t, enc, cfg.n_ctx - 2) for t in lambada_texts]
    # loglikelihood (and loglikelihood_rolling, which sends its windows the same way): one batch of token ids.
    body = {"model": "tiny", "prompt": [seq for seq, _ in rows], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    status, got = post(server, body)
    assert status == 200
    nll, greedy = score.score_rows(layered, cfg, rows)
    for choice, (seq, n), want_nll, want_greedy in zip(sorted(got["choices"], key=lambda c: c["index"]), rows, nll,
                                                         greedy):
        ctxlen = len(seq) - n
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        assert len(choice["logprobs"]["token_logprobs"]) == len(seq) + 1  # exactly one generated entry
        assert -sum(lps) == pytest.approx(want_nll, rel=1e-5)
        assert all(t == max(top.values()) for t, top in zip(lps, tops)) == want_greedy
    windows = score.rolling_windows(enc.encode_ordinary(text), cfg.n_ctx - 2)
    status, got = post(server, {**body, "prompt": [seq for seq, _ in windows]})
    total = sum(sum(c["logprobs"]["token_logprobs"][len(seq) - n:-1]) for c, (seq, n) in zip(got["choices"], windows))
    assert len(windows) == 3 and -total == pytest.approx(score.score_rows(layered, cfg, windows)[0].sum(), rel=1e-5)
    # generate_until: token ids, greedy, its stop strings with the end-of-text token added.
    body = {"prompt": [prompts[1]], "model": "tiny", "max_tokens": 12, "temperature": 0,
            "stop": ["\n\n", "<|endoftext|>"], "seed": 1234}
    status, got = post(server, body)
    want = enc.decode(recompute_greedy(params, prompts[1], 12, eot=data.EOT))
    assert status == 200 and got["choices"][0]["text"] == want.split("\n\n")[0]


def test_generated_end_of_text_is_reported(server, post, enc, prompts, params):
    """A row that ends with <|endoftext|> reports it in its logprobs (and counts it), though not in its text."""
    nudge = {str(data.EOT): 100.0}  # make the model end at once
    status, got = post(server, {"prompt": [prompts[0]], "max_tokens": 1, "echo": True, "logprobs": 1,
                                "temperature": 0, "logit_bias": nudge})
    choice = got["choices"][0]
    assert choice["text"] == enc.decode(prompts[0]) and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"][-1] == "<|endoftext|>" and len(choice["logprobs"]["tokens"]) == 4
    assert got["usage"]["completion_tokens"] == 1


def test_stop_strings_end_generation_in_every_path(server, post, enc, prompts, reference):
    fulls = [enc.decode(r) for r in reference]
    stop = fulls[1][len(fulls[1]) // 2:len(fulls[1]) // 2 + 3]
    want = [(f[:f.index(stop)], "stop") if stop in f else (f, "length") for f in fulls]
    # Tokens generated: up to the one that completes the stop string, not max_tokens.
    ends = [next(i for i in range(1, 11) if stop in enc.decode(r[:i])) if stop in f else 10
            for r, f in zip(reference, fulls)]
    body = {"prompt": [enc.decode(p) for p in prompts], "max_tokens": 10, "temperature": 0, "stop": stop}
    status, got = post(server, body)
    assert [(c["text"], c["finish_reason"]) for c in got["choices"]] == want
    assert got["usage"]["completion_tokens"] == sum(ends) < 30
    status, events = post(server, {**body, "stream": True, "stream_options": {"include_usage": True}}, raw=True)
    assert [(c["text"], c["finish_reason"]) for c in streamed(events, 3)] == want
    assert chunks_of(events)[-1]["usage"]["completion_tokens"] == sum(ends)


def test_n_seeds_and_penalties(server, post, cfg, enc, prompts, recompute_greedy, params, layered):
    body = {"prompt": ["Once upon", "a time"], "n": 2, "max_tokens": 6, "temperature": 1.0, "top_k": 40, "seed": 7}
    status, first = post(server, body)
    assert status == 200 and [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert post(server, body)[1]["choices"] == first["choices"]
    assert first["choices"][0]["text"] != first["choices"][1]["text"]
    # The same rows in-process: choice i*n + j is key (seed, i*n + j).
    rows = [decode.Row(decode.prompt_ids(enc, p), 6, 1.0, 40, 1.0, (7, i * 2 + j))
            for i, p in enumerate(body["prompt"]) for j in range(2)]
    assert [c["text"] for c in first["choices"]] == [enc.decode(x) for x in decode.complete(layered, cfg, rows)]
    body = {"prompt": [prompts[1]], "max_tokens": 10, "temperature": 0, "frequency_penalty": 1.5,
            "presence_penalty": -0.5, "logit_bias": {"13": 5.0}}
    want = recompute_greedy(params, prompts[1], 10, frequency=1.5, presence=-0.5, bias={13: 5.0})
    assert post(server, body)[1]["choices"][0]["text"] == enc.decode(want)


# ---------------------------------------------------------------- continuous batching

def test_a_seeded_request_alone_and_amid_traffic_gives_the_same_text(server, post, steps, pool, wait_until):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    alone = post(server, body)[1]["choices"][0]["text"]
    others = [{"prompt": [list(range(100 + i, 110 + 2 * i))], "max_tokens": 5 + 3 * i, "temperature": 0.7, "seed": i,
               "logprobs": i % 3 if i % 2 else None, "frequency_penalty": 0.5 * (i % 2)} for i in range(5)]
    running = lambda *seeds: all(decoding(server, key=(seed, 0)) for seed in seeds)
    queued = lambda n: lambda: server.jobs.qsize() == n
    # Others of all lengths and settings: one decoding when it arrives, two arriving with it, two while it decodes.
    steps.hold()
    asked = [pool.submit(post, server, others[0])]
    steps.until(lambda: running(0), "the first other request to be decoding")
    asked += [pool.submit(post, server, others[i]) for i in (1, 2)]
    wait_until(queued(2), "two more requests to be queued")
    mine = pool.submit(post, server, body)
    wait_until(queued(3), "the seeded request to be queued")
    steps.until(lambda: running(11), "the seeded request to be decoding")
    assert running(0, 1, 2)
    asked += [pool.submit(post, server, others[i]) for i in (3, 4)]
    wait_until(queued(2), "the last two requests to be queued")
    steps.until(lambda: running(3, 4), "the last two requests to be decoding")
    assert running(11)
    steps.release()
    assert all(a.result()[0] == 200 for a in asked) and mine.result()[1]["choices"][0]["text"] == alone


def test_a_short_request_does_not_wait_for_a_long_one(server, post, steps, pool, wait_until, patience):
    """Continuous batching: a request arriving while another generates joins the batch and leaves when done."""
    steps.hold()
    body = {"prompt": "A", "max_tokens": 60, "temperature": 0, "stream": True, "logit_bias": {str(data.EOT): -100}}
    long = pool.submit(post, server, body, True)
    steps.until(lambda: decoding(server, max_new=60), "the long request to be decoding")
    short = pool.submit(post, server, {"prompt": "B", "max_tokens": 2, "temperature": 0, "stream": True}, True)
    wait_until(lambda: server.jobs.qsize() == 1, "the short request to be queued")
    steps.until(lambda: decoding(server, max_new=2), "the short request to join the batch")
    [joined] = decoding(server, max_new=2)
    steps.until(lambda: joined.job.answered, "the short request to be answered")
    # Its whole reply arrives while the long request is held mid-generation.
    assert streamed(short.result(timeout=patience)[1], 1)[0]["finish_reason"] == "length"
    assert not long.done() and decoding(server, max_new=60)
    steps.release()
    assert streamed(long.result()[1], 1)[0]["finish_reason"] == "length"


def test_the_batch_and_cache_grow_by_buckets(server, post, steps, pool, wait_until):
    """A request alone decodes as a batch of one with a cache just big enough, n_ctx over a power of 4 (here 16
    or 64 slots); the batch grows as rows join, and starts afresh once idle."""
    wait_until(lambda: not server.engine.busy(), "the server to be idle")
    before = len(server.engine.layouts)
    post(server, {"prompt": "x", "max_tokens": 40})
    assert server.engine.layouts[before:] == [(1, 64)]
    wait_until(lambda: server.engine.batch is None, "the server to drop its cache once idle")
    steps.hold()
    long = pool.submit(post, server, {"prompt": "x", "max_tokens": 12, "temperature": 0, "stream": True}, True)
    steps.until(lambda: decoding(server), "the 12-token request to be decoding")
    three = pool.submit(post, server, {"prompt": ["x", "y", "z"], "max_tokens": 20})
    wait_until(lambda: server.jobs.qsize() == 1, "the three prompts to be queued")
    steps.until(lambda: decoding(server, max_new=20), "the three prompts to join the batch")
    assert decoding(server, max_new=12)  # still generating
    steps.release()
    assert long.result()[0] == three.result()[0] == 200
    # One size at a time: rows, then slots per row.
    assert server.engine.layouts[before + 1:] == [(1, 16), (4, 16), (4, 64)]


def test_a_client_that_goes_away_stops_its_generation(server, steps, wait_until, patience):
    body = {"prompt": "Hi", "max_tokens": 60, "stream": True, "logit_bias": {str(data.EOT): -100}}
    body = json.dumps(body).encode()
    before = server.engine.steps_run
    steps.hold()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=patience) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        steps.until(lambda: decoding(server), "the request to be decoding")
        [row] = decoding(server)
        # A step at a time once its handler has taken all it was sent: the server cannot run far ahead of its
        # writes, which are how it learns that the client has gone.
        steps.pace = lambda: row.job.events.empty() or row.job.cancelled
        steps.release()
        seen, deadline = b"", time.monotonic() + patience
        while b"data: " not in seen:  # the first token has come
            chunk = s.recv(4096)
            assert chunk and time.monotonic() < deadline, f"no token came, only {seen!r}"
            seen += chunk
    wait_until(lambda: not server.engine.busy(), "the server to stop generating")
    assert row.reason == "cancelled" and server.engine.steps_run - before < 30  # far short of 60 tokens


def fail_once(monkeypatch, name, message):
    """decode.<name> raises once, then works again."""
    real = getattr(decode, name)

    def broken(*a, **kw):
        monkeypatch.setattr(decode, name, real)
        raise RuntimeError(message)

    monkeypatch.setattr(decode, name, broken)


def test_a_failed_prefill_answers_a_request_that_had_waited(cfg, layered, post, steps, pool, wait_until, monkeypatch):
    """A request waiting for a free row is answered (500) when its prefill fails, not left hanging."""
    server = serve.serve(layered, cfg, "127.0.0.1", 0, slots=1)
    try:
        steps.hold()
        body = {"prompt": "a", "max_tokens": 30, "stream": True, "logit_bias": {str(data.EOT): -100}}
        first = pool.submit(post, server, body, True)
        steps.until(lambda: decoding(server), "the first request to be decoding")
        fail_once(monkeypatch, "fill", "out of memory")
        second = pool.submit(post, server, {"prompt": "b", "max_tokens": 4})
        wait_until(lambda: server.jobs.qsize() == 1, "the second request to be queued")
        steps.until(lambda: server.engine.waiting, "the second request to wait for a row")
        assert decoding(server)  # the first still has the only row
        steps.release()
        status, got = second.result()
        assert status == 500 and "out of memory" in got["error"]
        status, events = first.result()
        assert status == 200 and streamed(events, 1)[0]["finish_reason"] == "length"
        assert post(server, {"prompt": "c", "max_tokens": 4})[0] == 200
    finally:
        steps.release()  # or close() would wait for a held step
        server.close()


def test_a_failed_step_answers_500_and_the_server_carries_on(server, post, monkeypatch):
    fail_once(monkeypatch, "step", "device on fire")
    status, got = post(server, {"prompt": "x", "max_tokens": 4})
    assert status == 500 and "device on fire" in got["error"]
    assert post(server, {"prompt": "x", "max_tokens": 4})[0] == 200


def same_choices(got, want):
    """The same texts, finish reasons and tokens; logprobs equal to float32's rounding (a batch of other rows
    than the request's own rounds its logits differently)."""
    strip = lambda c: {**c, "logprobs": c["logprobs"] and c["logprobs"]["tokens"]}
    close = lambda a, b: a is None and b is None or np.allclose(a, b, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert strip(g) == strip(w)
        if w["logprobs"]:
            lp, wlp = g["logprobs"], w["logprobs"]
            assert all(close(a, b) for a, b in zip(lp["token_logprobs"], wlp["token_logprobs"], strict=True))
            assert [set(t) for t in lp["top_logprobs"]] == [set(t) for t in wlp["top_logprobs"]]
    return True


def test_several_tokens_per_call_answer_as_one_token_per_call(cfg, layered, server, post):
    """The server decodes a few steps per compiled call (decode.Pace); one step per call gives the same answers:
    seeded samples alone and several at once, stop strings met mid-call, max_tokens, logprobs, penalties, n,
    streamed or not."""
    one = serve.serve(layered, cfg, "127.0.0.1", 0, slots=8, chunk=1)
    try:
        body = {"prompt": ["Once upon a time", "The"], "max_tokens": 30, "temperature": 0.9, "seed": 5, "n": 2,
                "logit_bias": {str(data.EOT): -100}}
        texts = [c["text"] for c in post(one, body)[1]["choices"]]
        stop = texts[0][len(texts[0]) // 2:len(texts[0]) // 2 + 2]  # met mid-way through the first completion
        bodies = [body, {**body, "stop": [stop, "\n\n"]}, {**body, "max_tokens": 13, "logprobs": 2},
                  {**body, "frequency_penalty": 1.0, "top_k": 20, "max_tokens": 17},
                  {"prompt": "A", "max_tokens": 25, "temperature": 0, "logprobs": 1, "stop": "\n"}]
        for b in bodies:
            want = post(one, b)[1]["choices"]
            for got, want in [(post(server, b)[1]["choices"], want),
                              *[(streamed(post(s, {**b, "stream": True}, raw=True)[1], len(want)) for s in (server, one))]]:
                assert same_choices(got, want), b
        assert any(c["finish_reason"] == "stop" for c in post(server, bodies[1])[1]["choices"])
        assert one.engine.steps_run <= one.engine.calls and server.engine.steps_run > 1.5 * server.engine.calls
    finally:
        one.close()


compiles = []  # the XLA compilations of this process, while a test listens
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: compiles.append(name) if compiles and name.endswith("backend_compile_duration") else None)


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one device", "dp2 x mp2"])
def test_compiling_every_shape_before_serving(cfg, layered, mesh_params, on_mesh, post, get, patience):
    """With compile_all, the model thread compiles every program of every shape the engine can meet before any
    request, /health answering 503 meanwhile; then traffic of every shape compiles nothing, on a mesh too (where
    each program's outputs must come out split as traffic's inputs are)."""
    small = dataclasses.replace(cfg, n_ctx=32)  # programs of its own: none was compiled by another test
    params, mesh = mesh_params if on_mesh else (layered, None)
    log = io.StringIO()
    server = serve.Server(("127.0.0.1", 0), params, small, slots=4, compile_all=True, log=log, mesh=mesh)
    server.loop.start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="503"):
            get(server, "/health")
        compiles.append("listening")
        server.worker.start()
        assert server.ready.wait(patience) and get(server, "/health") == (200, {"status": "ok"})
        assert len(compiles) > 10 and "programs" in log.getvalue() and server.compile_s > 0
        del compiles[1:]
        bodies = [{"prompt": [list(range(1, 1 + n))] * r, "max_tokens": m, "temperature": 0.5, "logprobs": k}
                  for n, r, m, k in [(1, 1, 1, None), (20, 1, 12, 3), (3, 3, 20, 1), (30, 4, 2, 0), (9, 2, 23, None)]]
        assert post(server, bodies[0])[0] == 200  # alone: the smallest batch; then together, batches that grow
        threads = [threading.Thread(target=post, args=(server, b)) for b in bodies[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert post(server, {"prompt": [list(range(1, 25))], "echo": True, "logprobs": 1, "max_tokens": 1})[0] == 200
        assert compiles == ["listening"], compiles[1:]
        assert {rows for rows, _ in server.engine.layouts} == {2 if on_mesh else 1, 4}  # rows: a multiple of dp
    finally:
        compiles.clear()
        server.close()


# ---------------------------------------------------------------- the openai client

def test_the_openai_client(server, enc, prompts, patience, reference):
    openai = pytest.importorskip("openai", reason="pip install -r requirements-dev.txt")
    client = openai.OpenAI(base_url=url(server, "/v1"), api_key="unused", timeout=patience, max_retries=0)
    assert [(m.id, m.model_extra["max_model_len"]) for m in client.models.list()] == [("tiny", 64)]
    text = enc.decode(prompts[0])
    got = client.completions.create(model="tiny", prompt=text, max_tokens=10, temperature=0)
    assert got.choices[0].text == enc.decode(reference[0]) and got.usage.completion_tokens == 10
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=text, max_tokens=10,
                                                                  temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == enc.decode(reference[0]) and len(pieces) > 1
    got = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=0, echo=True, logprobs=2)
    assert got.choices[0].text == text and got.choices[0].logprobs.token_logprobs[0] is None
    assert len(got.choices[0].logprobs.top_logprobs[1]) in (2, 3)
    got = client.completions.create(model="tiny", prompt=[prompts[0], prompts[1]], max_tokens=10, temperature=0, n=2,
                                    stop=["\n"], logprobs=1)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.choices[0].text == got.choices[1].text == enc.decode(reference[0]).split("\n")[0]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("body, message", [
    (b"{not json", "malformed JSON"),
    (b"[" * 100_000, "malformed JSON"),  # too deep for the parser
    ({"max_tokens": 4}, "'prompt'"),
    ({"prompt": 5}, "'prompt'"),
    ({"prompt": []}, "'prompt'"),
    ({"prompt": [[]]}, "'prompt'"),
    ({"prompt": [1, "a"]}, "'prompt'"),
    ({"prompt": [3, 50304]}, "outside [0, 50304)"),  # the tiny model's n_vocab
    ({"prompt": "x", "max_tokens": "5"}, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": -1}, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens'"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature'"),
    ({"prompt": "x", "top_p": 0}, "'top_p'"),
    ({"prompt": "x", "n": 0}, "'n'"),
    ({"prompt": "x", "stop": 3}, "'stop'"),
    ({"prompt": "x", "stream": "yes"}, "'stream'"),
    ({"prompt": "x", "echo": 1}, "'echo'"),
    ({"prompt": "x", "logprobs": 21}, "'logprobs'"),
    ({"prompt": "x", "logprobs": True}, "'logprobs'"),
    ({"prompt": "x", "presence_penalty": 3}, "'presence_penalty'"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "'logit_bias'"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "'logit_bias'"),
    ({"prompt": "x", "suffix": "end"}, "'suffix' is not supported"),
    ({"prompt": "x", "best_of": 3}, "'best_of' is not supported"),
    ({"prompt": "x", "repetition_penalty": 1.2}, "presence_penalty or frequency_penalty"),
    ({"prompt": "x", "ignore_eos": True}, "'ignore_eos' is not supported"),
    ({"prompt": "x", "min_tokens": 3}, "'min_tokens' is not supported"),
    ({"prompt": "x", "temprature": 0}, "unknown field 'temprature'"),
    ({"prompt": "x", "stream": True, "stream_options": {"x": 1}}, "'stream_options'"),
    ({"prompt": "x " * 60, "max_tokens": 10}, "exceed the context of 64"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, post, body, message):
    status, got = post(server, body)
    assert status == 400 and message in got["error"]
    neutral = {"user": "u", "best_of": 1, "ignore_eos": False, "repetition_penalty": 1.0, "suffix": None, "min_tokens": 0}
    assert post(server, {"prompt": "x", "max_tokens": 1, **neutral})[0] == 200


def test_only_json_bodies_and_extreme_settings(server, post, raw_reply):
    status, got = post(server, b'{"prompt": "x"}', content_type="text/plain")
    assert status == 415 and "application/json" in got["error"]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
    reply = raw_reply(server, head % 999999999999)
    assert reply.startswith("HTTP/1.0 413") and "over the limit" in reply
    for extreme in ({"top_k": 3_000_000_000}, {"temperature": 1e300}):  # 1e300 is inf in float32
        status, got = post(server, {"prompt": "x", "max_tokens": 3, "seed": 1, **extreme})
        assert status == 200 and got["choices"][0]["finish_reason"] in ("stop", "length")
    reply = raw_reply(server, head % -1)
    assert reply.startswith("HTTP/1.0 400") and "Content-Length -1 is negative" in reply


def test_close_finishes_requests_in_flight(cfg, layered, post, steps, pool, wait_until):
    server = serve.serve(layered, cfg, "127.0.0.1", 0)
    try:
        steps.hold()
        body = {"prompt": "Hi", "max_tokens": 16, "stream": True, "logit_bias": {str(data.EOT): -100}}
        asked = pool.submit(post, server, body, True)
        steps.until(lambda: decoding(server), "the request to be decoding")
        closing = pool.submit(server.close)
        wait_until(lambda: server.socket.fileno() == -1, "the server to stop listening")
        assert not asked.done()  # held mid-generation as close() began
        steps.release()
        closing.result()
        status, events = asked.result()
        assert status == 200 and streamed(events, 1)[0]["finish_reason"] == "length"
        with pytest.raises(OSError):
            post(server, {"prompt": "x"})
    finally:
        steps.release()
        server.close()  # again, if the test failed before it did: close() is idempotent


def test_a_server_on_a_mesh_answers_as_on_one_device(cfg, enc, prompts, mesh_params, post, reference):
    sharded, mesh = mesh_params
    server = serve.serve(sharded, cfg, "127.0.0.1", 0, mesh=mesh, slots=4)
    try:
        body = {"prompt": [prompts[0], prompts[1]], "max_tokens": 10, "temperature": 0, "logprobs": 1}
        status, got = post(server, body)
        assert status == 200 and [c["text"] for c in got["choices"]] == [enc.decode(r) for r in reference[:2]]
        assert all(t == max(top.values()) for c in got["choices"]
                   for t, top in zip(c["logprobs"]["token_logprobs"], c["logprobs"]["top_logprobs"]))
    finally:
        server.close()


def test_the_page_and_cross_origin_rules(cfg, patience, layered):
    """GET / is the playground, served with a policy that lets it talk to this server only. Another site's page
    gets no CORS preflight unless --allow_origin names it, and then only it does."""
    import http.client
    server = serve.serve(layered, cfg, "127.0.0.1", 0, slots=1, allow_origin=["https://ok.example"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=patience)
        conn.request("GET", "/")
        reply = conn.getresponse()
        page = reply.read().decode()
        assert reply.status == 200 and reply.getheader("Content-Type") == "text/html; charset=utf-8"
        assert "connect-src 'self'" in reply.getheader("Content-Security-Policy") and 'id="generate"' in page
        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        conn.request("OPTIONS", "/v1/completions", headers=preflight)
        reply = conn.getresponse()
        assert reply.status == 403 and reply.getheader("Access-Control-Allow-Origin") is None
        assert "--allow_origin https://evil.example" in json.loads(reply.read())["error"]
        conn.request("OPTIONS", "/v1/completions", headers={**preflight, "Origin": "https://ok.example"})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 204 and reply.getheader("Access-Control-Allow-Origin") == "https://ok.example"
        assert "Content-Type" in reply.getheader("Access-Control-Allow-Headers")
        # A form post (text/plain: no preflight) from any page does nothing.
        conn.request("POST", "/v1/completions", body='{"prompt": "x"}',
                     headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
        reply = conn.getresponse()
        assert reply.status == 415 and reply.getheader("Access-Control-Allow-Origin") is None
        reply.read()
        assert server.engine.steps_run == 0
        conn.request("POST", "/v1/completions", body='{"prompt": "x", "max_tokens": 1}',
                     headers={"Content-Type": "application/json", "Origin": "https://ok.example"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("Access-Control-Allow-Origin") == "https://ok.example"
        reply.read()
        # DNS rebinding: a page whose own name now points at 127.0.0.1 is refused on a loopback server.
        for host, want in [("evil.example:8000", 403), ("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:80", 200)]:
            conn.request("GET", "/v1/models", headers={"Host": host})
            reply = conn.getresponse()
            assert reply.status == want, host
            reply.read()
    finally:
        server.close()

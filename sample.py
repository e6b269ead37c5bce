"""Generate, score, serve and benchmark GPT-J from the command line; the decoding itself is decode.py.

    python sample.py --prompt "To be, or not to be" [--greedy | --temperature 0.8 --top_p 0.9] [--json]
    python sample.py --score FILE | --lambada FILE.jsonl | --serve --port 8000 | --benchmark --preset small

Weights are held per layer (decode.unstack), so that each decoding step reads each weight once.
"""
import argparse
import dataclasses
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import data
import decode
import gptj
import shard

EOT = data.EOT
DEFAULT_RUN = "runs/shakespeare"


# ---------------------------------------------------------------- scoring

def rolling_windows(tokens, n_ctx, prefix=EOT):
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


@partial(jax.jit, static_argnames=("cfg", "mesh"))
def _score_batch(params, seqs, mask, cfg, mesh=None):
    logits, _ = decode.forward(params, seqs[:, :-1], cfg, mesh)
    nll = gptj.cross_entropy(logits, seqs[:, 1:])
    # Over the whole logit vector, padding ids included, as lm-evaluation-harness scores HF's GPT-J.
    hit = (logits.argmax(-1) == seqs[:, 1:]) | ~mask
    return jnp.where(mask, nll, 0.0).sum(-1), hit.all(-1)


def score_rows(params, cfg, rows, *, mesh=None, batch_size=8):
    """(seq, n) rows -> (summed NLL of each row's last n predictions [rows], all n greedy [rows]).
    Rows of similar length are batched together, right-padded to a bucketed length."""
    dp = 1 if mesh is None else mesh.shape[shard.DP]
    batch_size = -(-batch_size // dp) * dp
    nll, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        length = min(decode.bucket(len(rows[idx[0]][0]) - 1), cfg.n_ctx)
        seqs, mask = np.zeros((batch_size, length + 1), np.int32), np.zeros((batch_size, length), bool)
        for b, i in enumerate(idx):
            seq, n = rows[i]
            seqs[b, :len(seq)] = seq
            mask[b, len(seq) - 1 - n:len(seq) - 1] = True
        sums, hits = _score_batch(params, seqs, mask, cfg, mesh)
        nll[idx], greedy[idx] = np.asarray(sums)[:len(idx)], np.asarray(hits)[:len(idx)]
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
    seq = ((ctx or [EOT]) + target)[-(n_ctx + 1):]  # too long: keep the end, as the harness does
    return seq, min(len(target), len(seq) - 1)


def lambada(params, cfg, texts, enc, **kw) -> dict:
    """Accuracy (every target token greedy) and perplexity (exp of the mean summed target NLL)."""
    if not texts:
        raise ValueError("no LAMBADA examples to evaluate")
    nll, greedy = score_rows(params, cfg, [lambada_row(t, enc, cfg.n_ctx) for t in texts], **kw)
    return {"n": len(texts), "acc": float(greedy.mean()), "ppl": math.exp(nll.mean())}


# ---------------------------------------------------------------- serving

MAX_ROWS = 64  # completions per request


@dataclasses.dataclass
class _Job:
    rows: list
    stops: list
    stream: bool
    prompt_tokens: int
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # ("delta", index, text) ... "done"|"error"
    cancelled: bool = False


def _job(server, body: bytes) -> _Job:
    """A completions request checked and turned into rows; ValueError names the first problem."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(req, dict) or "prompt" not in req:
        raise ValueError("the body must be a JSON object with a 'prompt'")
    prompts = [req["prompt"]] if isinstance(req["prompt"], str) else req["prompt"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompt' must be a string or a non-empty list of strings")

    def number(name, default, integer, ok, rule):
        value = req.get(name)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
            raise ValueError(f"'{name}' must be {rule}")
        return value

    max_tokens = number("max_tokens", 16, True, lambda v: v >= 1, "an integer >= 1")
    temperature = number("temperature", 1.0, False, lambda v: v >= 0, "a number >= 0")
    top_p = number("top_p", 1.0, False, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = number("top_k", 0, True, lambda v: v >= 0, "an integer >= 0")
    n = number("n", 1, True, lambda v: 1 <= v * len(prompts) <= MAX_ROWS, f"an integer >= 1, n * prompts <= {MAX_ROWS}")
    seed = number("seed", int.from_bytes(os.urandom(4), "little"), True, lambda v: True, "an integer")
    stops = [req["stop"]] if isinstance(req.get("stop"), str) else req.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("'stop' must be a string or a list of strings")
    if not isinstance(req.get("stream", False), bool):
        raise ValueError("'stream' must be true or false")
    ids = [decode.prompt_ids(server.enc, p) for p in prompts]
    rows = [decode.Row(x, max_tokens, temperature, top_k, top_p, (seed, i * n + j))
            for i, x in enumerate(ids) for j in range(n)]
    decode.check(rows, server.cfg)
    return _Job(rows, stops, req.get("stream", False), sum(map(len, ids)))


class Server(ThreadingHTTPServer):
    """Handler threads queue jobs; one worker thread generates whatever jobs are waiting as one batch."""
    daemon_threads = False  # so that server_close() waits for the requests in flight

    def __init__(self, address, params, cfg, *, mesh=None, enc=None, max_batch=16, batch_wait=0.005):
        super().__init__(address, _Handler)
        self.params, self.cfg, self.mesh, self.enc = params, cfg, mesh, enc or data.tokenizer()
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.jobs, self.batches = queue.Queue(), []  # batches: rows per generated batch, for logs and tests
        self.worker = threading.Thread(target=self._work, name="model", daemon=True)
        self.loop = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no server error
            super().handle_error(request, client_address)

    def close(self):
        """Stop accepting, finish the requests in flight, then stop the worker."""
        self.shutdown()
        self.server_close()
        self.jobs.put(None)
        self.worker.join()

    def _work(self):
        while (job := self.jobs.get()) is not None:
            jobs, until = [job], time.monotonic() + self.batch_wait
            while sum(len(j.rows) for j in jobs) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # seen again once this batch is done
                    break
                jobs.append(job)
            try:
                self._run(jobs)
            except Exception as e:  # tell the clients, keep serving
                for job in jobs:
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _run(self, jobs):
        owners = [(job, i) for job in jobs for i in range(len(job.rows))]
        texts = [decode.Text(self.enc, job.stops) for job, _ in owners]

        def on_step(tok, new, done):
            for b, (job, i) in enumerate(owners):
                delta = texts[b].add(tok[b]) if new[b] else ""
                if delta and job.stream:
                    job.events.put(("delta", i, delta))
                done[b] |= texts[b].stopped or job.cancelled

        stepwise = any(job.stream for job in jobs)
        self.batches.append(len(owners))
        outs = decode.complete(self.params, self.cfg, [job.rows[i] for job, i in owners], mesh=self.mesh,
                        on_step=on_step if stepwise else None)
        choices = {id(job): [] for job in jobs}
        for b, (job, i) in enumerate(owners):
            for token in [] if stepwise else outs[b]:
                texts[b].add(token)
            rest = texts[b].flush()
            if rest and job.stream:
                job.events.put(("delta", i, rest))
            stopped = texts[b].stopped or len(outs[b]) < job.rows[i].max_new
            choices[id(job)].append(({"text": texts[b].text, "index": i, "logprobs": None,
                                      "finish_reason": "stop" if stopped else "length"}, len(texts[b].ids)))
        for job in jobs:
            job.events.put(("done", [c for c, _ in choices[id(job)]], sum(k for _, k in choices[id(job)])))


class _Handler(BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may stall mid-request, so that a dead one cannot hold up shutdown

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self):
        if self.path != "/v1/completions":
            return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(f"Content-Length {length} is negative")
            job = _job(self.server, self.rfile.read(length))
        except ValueError as e:
            return self._send(400, {"error": str(e)})
        self.server.jobs.put(job)
        head = {"id": f"cmpl-{os.urandom(12).hex()}", "object": "text_completion", "created": int(time.time()),
                "model": "gpt-j"}
        if job.stream:
            return self._stream(job, head)
        kind, *rest = job.events.get()
        if kind == "error":
            return self._send(500, {"error": rest[0]})
        choices, used = rest
        self._send(200, {**head, "choices": choices, "usage": {
            "prompt_tokens": job.prompt_tokens, "completion_tokens": used, "total_tokens": job.prompt_tokens + used}})

    def _stream(self, job, head):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            while True:
                kind, *rest = job.events.get()
                if kind == "delta":
                    self._event({**head, "choices": [{"text": rest[1], "index": rest[0], "finish_reason": None}]})
                elif kind == "error":
                    self._event({"error": rest[0]})
                    break
                else:
                    for choice in rest[0]:
                        self._event({**head, "choices": [{**choice, "text": ""}]})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away: stop generating for it
            job.cancelled = True

    def _event(self, obj):
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(params, cfg, host="127.0.0.1", port=8000, **kw) -> Server:
    """Start an OpenAI-style completions server in background threads; `.close()` stops it cleanly."""
    server = Server((host, port), params, cfg, **kw)
    server.worker.start()
    server.loop.start()
    return server


# ---------------------------------------------------------------- benchmark

def _best_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bandwidth(nbytes=None) -> float:
    """The default device's read bandwidth in bytes/s: the best time to sum an array far larger than its caches."""
    nbytes = nbytes or (1 << 31 if jax.default_backend() == "gpu" else 1 << 28)
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / _best_time(lambda: total(x), 10)


def benchmark(params, cfg, batch, max_new, *, mesh=None, prompt=None) -> dict:
    """Compile, warm up, then time prefill and greedy decoding of `batch` rows (EOT ignored, so every row
    decodes max_new tokens), beside the bound of reading every weight once per decoding step. The shapes are
    those decode.complete would give the same rows."""
    if max_new >= cfg.n_ctx:
        raise ValueError(f"{max_new} new tokens leave no room for a prompt in the context of {cfg.n_ctx}")
    random_ids = np.random.default_rng(0).integers(0, min(cfg.n_vocab, decode.VOCAB), min(128, cfg.n_ctx - max_new))
    ids = prompt or random_ids.tolist()
    rows = [decode.Row(ids, max_new)] * batch
    decode.check(rows, cfg)
    tokens, start, knobs, limit, steps = decode.pack(rows, mesh)
    t = time.perf_counter()
    prefill = decode.prefill.lower(params, tokens, start, knobs, cfg, tokens.shape[1] + steps, mesh).compile()
    loop = decode.generate.lower(params, tokens, start, knobs, limit, cfg, steps, mesh=mesh, eot=-1).compile()
    compile_s = time.perf_counter() - t
    prefill_s = _best_time(lambda: prefill(params, tokens, start, knobs))
    total_s = _best_time(lambda: loop(params, tokens, start, knobs, limit, eot=-1))
    decode_tps = batch * (max_new - 1) / max(total_s - prefill_s, 1e-9)
    # The path streaming and the server take: one compiled step per token, each token back on the host.
    stream = lambda: decode.complete(params, cfg, rows, mesh=mesh, on_step=lambda *_: None, eot=-1)
    stream()  # compiles its prefill and step
    stream_s = _best_time(stream)
    # Each step reads every weight but the embedding table, of which it gathers only one row per sequence.
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wte"].nbytes
    bandwidth = memory_bandwidth()
    mp = 1 if mesh is None else mesh.shape[shard.MP]  # each of mp devices reads only its slice
    bound = batch * bandwidth * mp / weights  # dummy rows padding the batch add no tokens
    return {"device": jax.devices()[0].device_kind, "dtype": cfg.dtype, "batch": batch, "prompt_tokens": len(ids),
            "new_tokens": max_new, "compile_s": round(compile_s, 3), "time_to_first_token_s": round(prefill_s, 5),
            "prefill_tokens_per_s": round(batch * len(ids) / prefill_s, 1), "decode_tokens_per_s": round(decode_tps, 1),
            "weights_bytes": weights, "bandwidth_bytes_per_s": round(bandwidth), "decode_bound_tokens_per_s":
            round(bound, 1), "fraction_of_bound": round(decode_tps / bound, 3),
            "loop_ms_per_token": round(1e3 * (total_s - prefill_s) / (max_new - 1), 3),
            "stream_ms_per_token": round(1e3 * (stream_s - prefill_s) / (max_new - 1), 3)}


# ---------------------------------------------------------------- command line

def _jsonl(path):
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None


def load(args):
    """-> (per-layer params on the device or split over the mesh, cfg, mesh) as the flags say."""
    mesh = None
    if args.mesh:
        try:
            dp, mp = (int(x) for x in args.mesh.split(","))
        except ValueError:
            raise ValueError(f"--mesh {args.mesh!r} must be DP,MP: two integers, such as 1,8") from None
        mesh = shard.make_mesh(dp, mp)
    if args.preset:
        cfg = dataclasses.replace(gptj.PRESETS[args.preset], dtype=args.dtype)
        if mesh is not None:
            shard.check(cfg, mesh)
        init = lambda key: jax.tree.map(lambda x: x.astype(args.dtype), gptj.init_params(cfg, key))
        key = jax.random.key(args.seed)
        # Made already split over the mesh, not whole on one device first: GPT-J-6B may not fit one.
        split = None if mesh is None else shard.named(mesh, shard.param_specs(jax.eval_shape(init, key)))
        params = jax.jit(init, out_shardings=split)(key)
    else:
        import ckpt  # only checkpoints need it
        path = args.checkpoint or ckpt.latest(DEFAULT_RUN)
        if not path:
            raise ValueError(f"no checkpoint in {DEFAULT_RUN}: train one with `python train.py`, or pass --checkpoint")
        params, cfg = ckpt.load_weights(path, config=args.config, mesh=mesh, dtype=args.dtype)
        cfg = dataclasses.replace(cfg, dtype=args.dtype)
    return decode.unstack(params, free=True), cfg, mesh


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with GPT-J, score text, or serve completions over HTTP.")
    p.add_argument("--checkpoint", help=f"weights, native, HF or original format (default: latest in {DEFAULT_RUN})")
    p.add_argument("--config", help="the original project's JSON config, for its checkpoints (which carry none)")
    p.add_argument("--preset", choices=sorted(gptj.PRESETS), help="random weights of this preset, no checkpoint")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute")
    p.add_argument("--mesh", help="DP,MP: the batch split over DP, the weights over MP devices")
    p.add_argument("--prompt", action="append", default=[], help="repeatable; with no prompt, lines of stdin")
    p.add_argument("--prompt_file", help='one prompt, or a .jsonl of strings or {"prompt": ...} objects')
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1 keeps all")
    p.add_argument("--top_k", type=int, default=0, help="0 keeps all")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt; the batch for --benchmark")
    p.add_argument("--batch_size", type=int, default=16, help="rows generated or scored together")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, in prompt order")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--score", metavar="FILE", help="mean NLL per token of a text file")
    mode.add_argument("--lambada", metavar="FILE", help='LAMBADA accuracy and perplexity of a .jsonl of {"text"}')
    mode.add_argument("--serve", action="store_true", help="serve POST /v1/completions and GET /health")
    mode.add_argument("--benchmark", action="store_true", help="time prefill and decoding")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    checks = [(args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
              (args.temperature >= 0, "--temperature must be >= 0"), (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
              (args.top_k >= 0, "--top_k must be >= 0"), (args.num_samples >= 1, "--num_samples must be at least 1"),
              (args.batch_size >= 1, "--batch_size must be at least 1"),
              (0 <= args.port <= 65535, "--port must be in 0..65535")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    return args


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompt_file and args.prompt_file.endswith(".jsonl"):
        lines = [x.get("prompt") if isinstance(x, dict) else x for x in _jsonl(args.prompt_file)]
        if not all(isinstance(x, str) for x in lines):
            raise ValueError(f"{args.prompt_file}: each line must be a string or an object with a string 'prompt'")
        if not lines:
            raise ValueError(f"{args.prompt_file}: no prompts in it")
        prompts += lines
    elif args.prompt_file:
        prompts.append(Path(args.prompt_file).read_text())
    return prompts


def sample_cli(args, params, cfg, mesh, enc, prompts, out, first=0):
    """Complete the prompts; a lone sample streams to `out` token by token."""
    temperature = 0.0 if args.greedy else args.temperature
    rows, texts = [], []
    for p, text in enumerate(prompts, first):
        ids = decode.prompt_ids(enc, text)
        for j in range(args.num_samples):
            key = (args.seed, p * args.num_samples + j)
            rows.append(decode.Row(ids, args.max_new_tokens, temperature, args.top_k, args.top_p, key))
            texts.append(text)
    decode.check(rows, cfg)  # all of them before any output
    if len(rows) == 1 and not args.json:
        shown = decode.Text(enc)
        out.write(texts[0])
        out.flush()

        def show(tok, new, done):
            if new[0]:
                out.write(shown.add(tok[0]))
                out.flush()

        decode.complete(params, cfg, rows, mesh=mesh, on_step=show)
        out.write(shown.flush() + "\n")
        return
    for lo in range(0, len(rows), args.batch_size):
        outs = decode.complete(params, cfg, rows[lo:lo + args.batch_size], mesh=mesh)
        for text, ids in zip(texts[lo:], outs):
            completion = enc.decode(ids)
            if args.json:
                print(json.dumps({"prompt": text, "completion": completion, "completion_ids": ids}), file=out)
            else:
                print(f"{text}{completion}\n{'-' * 40}", file=out)
        out.flush()


def run(args, out=None):
    out, enc = out or sys.stdout, data.tokenizer()
    # Read every input before the weights, which can take minutes to load.
    prompts = read_prompts(args)
    text = Path(args.score).read_text() if args.score else None
    if args.lambada:
        texts = [x.get("text") if isinstance(x, dict) else None for x in _jsonl(args.lambada)]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f'{args.lambada}: each line must be an object with a string "text"')
    params, cfg, mesh = load(args)
    kw = dict(mesh=mesh, batch_size=args.batch_size)
    if args.score:
        print(json.dumps(score_text(params, cfg, text, enc, **kw)), file=out)
    elif args.lambada:
        print(json.dumps(lambada(params, cfg, texts, enc, **kw)), file=out)
    elif args.benchmark:
        prompt = decode.prompt_ids(enc, args.prompt[0]) if args.prompt else None
        report = benchmark(params, cfg, args.num_samples, args.max_new_tokens, mesh=mesh, prompt=prompt)
        print(json.dumps(report), file=out)
    elif args.serve:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # before the line below: a client may act on it at once
        server = serve(params, cfg, args.host, args.port, mesh=mesh, enc=enc, max_batch=args.batch_size)
        print(f"serving http://{args.host}:{server.server_address[1]}/v1/completions; SIGTERM or Ctrl-C stops",
              file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.close()
    elif prompts:
        sample_cli(args, params, cfg, mesh, enc, prompts, out)
    else:
        interactive, n = sys.stdin.isatty(), 0
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                try:
                    sample_cli(args, params, cfg, mesh, enc, [line.rstrip("\n")], out, first=n)
                except ValueError as e:  # a bad line should not end the session
                    print(f"error: {e}", file=sys.stderr)
                n += 1


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    shard.keep_freed_host_memory()  # before JAX starts its threads: the stepwise path allocates per token
    sys.exit(main())

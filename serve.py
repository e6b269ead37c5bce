"""An OpenAI-compatible completions server for GPT-J, with continuous batching; `sample.py --serve` starts it.

    POST /v1/completions   OpenAI's completions API as vLLM serves it: prompts as strings or token ids, echo,
                           logprobs, penalties, logit_bias, stop, n, seed, stream
    GET  /v1/models        the one model served, with its context length (max_model_len)
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer endpoints (lm-evaluation-harness)
    GET  /health
    GET  /                 a playground page (assets/playground.html): prompt, settings, the completion streamed in,
                           each token coloured by its probability, the alternatives on hover

One model thread owns the device. It keeps a batch of up to `slots` rows decoding, one compiled step for
all of them at a time; at every step the requests that arrived are prefilled together and join the batch in
free rows, and finished rows leave it at once, so a request never waits for other requests to finish. The
batch has as many rows as are running (a power of 4) and the cache as many slots per row as the longest may
need (a power of 2), grown when that is not enough: a request alone decodes as a batch of one. HTTP handler
threads parse requests, hand them to the model thread and write out what it sends back.
"""
import dataclasses
import ipaddress
import json
import math
import os
import queue
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import numpy as np

import data
import decode
import gptj
import score
import shard

EOT = data.EOT
PAGE = Path(__file__).resolve().parent / "assets" / "playground.html"  # GET /: the playground
MAX_ROWS = 1024  # completions per request, prompts x n: they queue for the batch's slots
PREFILL_TOKENS = 4096  # prompt tokens prefilled at once, padding included; at least one prompt
MAX_BODY = 64 << 20  # bytes of a request body
IGNORED = {"model", "user"}  # bookkeeping fields: one model is served, and who asks changes nothing
# Fields that would change the answer and are not implemented: what they ask for, and their values that ask nothing.
UNSUPPORTED = {"suffix": ("insertion", [None, ""]), "best_of": ("best_of > n", [None, 1]),
               "min_tokens": ("min_tokens", [None, 0]), "ignore_eos": ("ignore_eos", [None, False]),
               "repetition_penalty": ("repetition_penalty (use presence_penalty or frequency_penalty)", [None, 1]),
               "min_p": ("min_p", [None, 0]), "use_beam_search": ("beam search", [None, False]),
               "stop_token_ids": ("stop_token_ids", [None, []]),
               "prompt_logprobs": ("prompt_logprobs (use echo with logprobs)", [None])}
FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
          "echo", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}


# ---------------------------------------------------------------- requests

@dataclasses.dataclass
class Job:
    """One completions request: its choices, and the events the model thread sends to its handler."""
    choices: list
    stream: bool
    usage_chunk: bool  # stream_options.include_usage
    prompt_tokens: int
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # ("chunk", choice) ... ("done",) | ("error", msg)
    cancelled: bool = False  # the client went away: stop generating for it
    answered: bool = False  # its last event is sent

    def usage(self):
        used = sum(c.generated for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": used, "total_tokens": self.prompt_tokens + used}


class Choice:
    """One completion of a request: a decoding row, its text as tokens arrive, and its logprobs."""

    def __init__(self, job, index, row, enc, stops, echo, logprobs):
        self.job, self.index, self.row, self.enc, self.k = job, index, row, enc, logprobs  # k: None or 0..MAX
        self.text = decode.Text(enc, stops)
        self.echo = echo
        self.head, self.head_lp = "", None  # the echoed prompt: its text and logprobs
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.n, self.generated, self.done, self.reason = 0, 0, False, None  # n: tokens in the text

    def echo_prompt(self, scores=None):
        """The prompt's text (and logprobs: none for its first token) ahead of the completion."""
        t = decode.Text(self.enc)
        offsets = []
        for tok in self.row.ids:
            offsets.append(len(t.text))
            t.add(tok)
        t.flush()
        self.head = t.text
        if self.k is not None:
            tops = [None] + [self._top(s, self.row.ids[i + 1]) for i, s in enumerate(scores or [])]
            self.head_lp = {"tokens": [decode.token_name(self.enc, x) for x in self.row.ids],
                            "token_logprobs": [None] + [float(s["logprob"]) for s in scores or []],
                            "top_logprobs": tops, "text_offset": offsets}

    def _top(self, s, token):
        """The k likeliest tokens and the chosen one (so up to k + 1), as OpenAI returns them."""
        top = {decode.token_name(self.enc, int(i)): float(v) for i, v in
               zip(s.get("top_ids", [])[:self.k], s.get("top_logprobs", [])[:self.k])}
        top.setdefault(decode.token_name(self.enc, int(token)), float(s["logprob"]))
        return top

    def add(self, token, new, done, scores):
        """A generated token, with decode.finish's verdict -> the text now safe to show and the token's
        logprobs (None if not asked)."""
        offset = len(self.head) + len(self.text.text)
        delta = self.text.add(token) if new else ""
        self.generated += 1  # <|endoftext|> too: it is reported, so counted
        entry = None
        if self.k is not None:
            entry = {"tokens": [decode.token_name(self.enc, token)], "token_logprobs": [float(scores["logprob"])],
                     "top_logprobs": [self._top(scores, token)], "text_offset": [offset]}
            for name, values in entry.items():
                self.lp[name] += values
        if done or self.text.stopped:
            self.done, self.reason = True, "length" if new and not self.text.stopped else "stop"
        return delta, entry

    def result(self):
        lp = None
        if self.k is not None:
            lp = self.lp if self.head_lp is None else {n: self.head_lp[n] + self.lp[n] for n in self.lp}
        return {"index": self.index, "text": self.head + self.text.text, "logprobs": lp,
                "finish_reason": self.reason}


def parse(body: bytes, cfg, enc) -> Job:
    """A completions request checked and turned into choices; ValueError names the first problem."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(req, dict) or "prompt" not in req:
        raise ValueError("the body must be a JSON object with a 'prompt'")
    for name, value in req.items():
        if name in UNSUPPORTED:
            what, neutral = UNSUPPORTED[name]
            neutral = neutral + [req.get("n", 1)] * (name == "best_of")  # best_of == n: the n samples themselves
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
                raise ValueError(f"'{name}' is not supported here: {what}")
        elif name not in FIELDS | IGNORED:
            raise ValueError(f"unknown field '{name}'")

    def number(name, default, integer, ok, rule):
        value = req.get(name)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
            raise ValueError(f"'{name}' must be {rule}")
        return value

    def flag(name):
        if not isinstance(req.get(name) or False, bool):
            raise ValueError(f"'{name}' must be true or false")
        return bool(req.get(name))

    ids = prompt_ids(req["prompt"], cfg, enc)
    max_tokens = number("max_tokens", 16, True, lambda v: v >= 0, "an integer >= 0")
    temperature = number("temperature", 1.0, False, lambda v: v >= 0, "a number >= 0")
    top_p = number("top_p", 1.0, False, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = number("top_k", 0, True, lambda v: v >= -1, "an integer >= 0 (0 or -1: no limit)")
    n = number("n", 1, True, lambda v: 1 <= v * len(ids) <= MAX_ROWS, f"an integer >= 1, n * prompts <= {MAX_ROWS}")
    seed = number("seed", int.from_bytes(os.urandom(4), "little"), True, lambda v: True, "an integer")
    presence = number("presence_penalty", 0.0, False, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    frequency = number("frequency_penalty", 0.0, False, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    k = req.get("logprobs")
    if k is not None:
        k = number("logprobs", 0, True, lambda v: 0 <= v <= decode.MAX_LOGPROBS,
                   f"an integer in [0, {decode.MAX_LOGPROBS}] or null")
    stops = [req["stop"]] if isinstance(req.get("stop"), str) else req.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("'stop' must be a string or a list of strings")
    stream, echo = flag("stream"), flag("echo")
    options = req.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise ValueError("'stream_options' must be an object with at most 'include_usage': true or false")
    bias = logit_bias(req.get("logit_bias"), cfg)
    for i, x in enumerate(ids):
        if len(x) + max_tokens > cfg.n_ctx:
            raise ValueError(f"prompt {i}: {len(x)} tokens plus max_tokens {max_tokens} exceed the context of "
                             f"{cfg.n_ctx} tokens: shorten the prompt or lower max_tokens")
    job = Job([], stream, bool(options.get("include_usage")), sum(map(len, ids)))
    for i, x in enumerate(ids):
        for j in range(n):
            row = decode.Row(x, max_tokens, temperature, max(top_k, 0), top_p, (seed, i * n + j), presence, frequency,
                             bias)
            job.choices.append(Choice(job, i * n + j, row, enc, stops, echo, k))
    return job


def prompt_ids(prompt, cfg, enc) -> list:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) -> a list of id lists."""
    ints = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        prompts = [prompt]
    elif ints(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ints(p) for p in prompt):
        prompts = prompt
    else:
        raise ValueError("'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                         "lists, none of them empty")
    ids = [decode.prompt_ids(enc, p) if isinstance(p, str) else p for p in prompts]
    for i, x in enumerate(ids):
        if min(x) < 0 or max(x) >= cfg.n_vocab:
            raise ValueError(f"prompt {i} has a token id outside [0, {cfg.n_vocab})")
    return ids


def logit_bias(bias, cfg) -> dict:
    if bias is None:
        return {}
    try:
        if not isinstance(bias, dict):
            raise ValueError
        out = {int(t): float(v) for t, v in bias.items() if not isinstance(v, bool)}
        if len(out) != len(bias) or any(not 0 <= t < cfg.n_vocab or not -100 <= v <= 100 for t, v in out.items()):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"'logit_bias' must map token ids in [0, {cfg.n_vocab}) to numbers in [-100, 100]") from None
    return out


# ---------------------------------------------------------------- the model thread

class Engine:
    """Continuous batching: a batch of up to `slots` rows that requests' rows join and leave between steps.

    Device state: the KV cache, each row's last token, its generated-token counts (for the penalties) and
    its sampling settings. Each step is queued before the previous one's tokens are read on the host, so
    the device never waits for Python; a row that finished is then dropped one step late, harmlessly.
    """

    def __init__(self, params, cfg, mesh, slots, enc):
        self.params, self.cfg, self.mesh, self.enc = params, cfg, mesh, enc
        self.dp = 1 if mesh is None else mesh.shape["dp"]
        self.slots = self._round(slots)  # the most rows decoding at once
        self.rows = []  # the Choice in each row of the batch, or None
        self.steps = np.zeros(0, np.int32)  # each row's own step count: its draws depend on it alone
        self.cache, self.counts, self.tok, self.knobs, self.cache_len = None, None, None, None, 0
        self.waiting = []  # choices admitted but not yet in the batch
        self.admitting = []  # choices on their way into it
        self.pending = []  # (device outputs, [(output row, choice)]) queued but not yet read
        self.steps_run, self.layouts = 0, []  # steps queued; each (rows, cache slots) the batch has had
        self.max_cache = decode.bucket(cfg.n_ctx)

    def _round(self, n):
        return -(-n // self.dp) * self.dp

    def _size(self, n):
        """Rows for a batch of n: a power of 4 (1, 4, 16, ...), at most `slots`, that the mesh's dp divides.
        Few sizes, so that the prefill, step and regrouping programs a crowd meets are soon all compiled."""
        return min(self.slots, self._round(4 ** math.ceil(math.log(max(n, 1), 4) - 1e-9)))

    def busy(self):
        return bool(self.waiting or self.pending or any(self.rows))

    def accept(self, jobs):
        """New requests: their echoed prompts scored now, their rows queued for the batch."""
        echo = [c for job in jobs for c in job.choices if c.echo]
        scored = [c for c in echo if c.k is not None]
        k = decode.top_bucket(max((c.k for c in scored), default=0))
        scores = score.token_scores(self.params, self.cfg, [c.row.ids for c in scored], mesh=self.mesh,
                                    batch_size=8, k=k) if scored else []
        for c, s in zip(scored, scores):
            c.echo_prompt([{name: x[i] for name, x in s.items()} for i in range(len(c.row.ids) - 1)])
        for c in echo:
            if c.k is None:
                c.echo_prompt()
        for job in jobs:
            for c in job.choices:
                if job.stream and (c.echo or c.row.max_new == 0):
                    job.events.put(("chunk", {"index": c.index, "text": c.head, "logprobs": c.head_lp,
                                              "finish_reason": "length" if c.row.max_new == 0 else None}))
                if c.row.max_new == 0:
                    c.done, c.reason = True, "length"
                    self._finished(c)
                else:
                    self.waiting.append(c)

    def admit(self):
        """Prefill waiting rows, as one batch, into free rows of the running batch."""
        self.waiting = [c for c in self.waiting if not c.job.cancelled]
        running = [c for c in self.rows if c is not None]
        # As many as fit, within a budget of prefilled tokens (padding included): a long prefill would stall the
        # running rows, and take memory.
        room, longest, new = self.slots - len(running), 0, []
        for c in self.waiting[:room]:
            longest = max(longest, len(c.row.ids))
            if new and self._size(len(new) + 1) * decode.bucket(longest) > PREFILL_TOKENS:
                break
            new.append(c)
        self.waiting = self.waiting[len(new):]
        if not new:
            return
        self.admitting = new  # until they are in the batch: a failure on the way must still answer them
        self._fit(running + new)
        batch = self._size(len(new))
        rows = [c.row for c in new] + [decode.Row([EOT], 1)] * (batch - len(new))
        tokens, lengths = decode.pack_prompts([r.ids for r in rows], batch)
        knobs = decode.put(decode.knobs(rows, self.cfg.n_vocab), self.mesh)
        out, cache, counts = decode.prefill(self.params, tokens, lengths, knobs, self.cfg, tokens.shape[1], self.mesh,
                                            logprobs=self._logprobs(new))
        free = [b for b, c in enumerate(self.rows) if c is None]
        pieces = decode.rows_of({"cache": cache, "counts": counts, "tok": out["token"], "knobs": knobs})
        for i, c in enumerate(new):
            self.cache, self.counts, self.tok, self.knobs = decode.insert(
                self.cache, self.counts, self.tok, self.knobs, pieces[i], np.array([free[i]], np.int32), mesh=self.mesh)
            self.rows[free[i]], self.steps[free[i]] = c, 1
        self.pending.append((out, list(enumerate(new))))
        self.admitting = []

    def _fit(self, choices):
        """Room in the batch and its cache for these rows. Both are sized by powers of two (the batch rounded
        to the mesh's dp), so that only a few shapes are ever compiled, and a lone request decodes as a batch
        of one. They grow as rows need and stay so while any row runs; once all have left, the next request
        starts afresh. (Shrinking as rows leave would meet ever new pairs of shapes to compile.)"""
        batch = self._size(len(choices))
        length = min(self.max_cache, decode.bucket(max(len(c.row.ids) + c.row.max_new for c in choices)))
        if self.cache is None:
            cache = gptj.init_cache(self.cfg, batch, length, per_layer=isinstance(self.params["h"], list))
            self.cache = cache if self.mesh is None else jax.device_put(
                cache, shard.named(self.mesh, shard.cache_specs(cache)))
            self.counts, self.tok, self.knobs = decode.put(
                (np.zeros((batch, self.cfg.n_vocab), np.int32), np.zeros(batch, np.int32),
                 decode.knobs([decode.Row([EOT], 1)] * batch, self.cfg.n_vocab)), self.mesh)
            self.rows, self.steps = [None] * batch, np.zeros(batch, np.int32)
        else:
            # Grown one size at a time (rows, then slots), so that only neighbouring sizes are ever regrouped.
            while len(self.rows) < batch or self.cache_len < length:
                rows = self._size(len(self.rows) * 4) if len(self.rows) < batch else len(self.rows)
                slots = self.cache_len if rows > len(self.rows) else min(self.max_cache, self.cache_len * 2)
                order = np.arange(rows, dtype=np.int32)  # the rows where they are, then empty ones
                self.cache, self.counts, self.tok, self.knobs = decode.regroup(
                    self.cache, self.counts, self.tok, self.knobs, order, slots, mesh=self.mesh)
                self.rows += [None] * (rows - len(self.rows))
                self.steps = np.concatenate([self.steps, np.zeros(rows - len(self.steps), np.int32)])
                self.cache_len = slots
                self.layouts.append((rows, slots))
            return
        self.cache_len = length
        self.layouts.append((batch, length))

    def _logprobs(self, choices):
        ks = [c.k for c in choices if c.k is not None]
        return decode.top_bucket(max(ks)) if ks else None

    def step(self):
        """Queue one step of every running row."""
        active = np.array([c is not None and not c.done for c in self.rows])
        if not active.any():
            return None
        running = [c for c in self.rows if c is not None and not c.done]
        out, self.cache, self.counts = decode.step(self.params, self.tok, self.cache, self.steps.copy(), self.counts,
                                                   self.knobs, active, self.cfg, self.mesh,
                                                   logprobs=self._logprobs(running))
        self.tok = out["token"]
        self.steps += active
        self.steps_run += 1
        return out, [(b, c) for b, c in enumerate(self.rows) if active[b]]

    def read(self, out, owners):
        """Tokens back on the host: each row's text and logprobs to its client; finished rows leave."""
        out = jax.tree.map(np.asarray, out)
        owners = [(r, c) for r, c in owners if not c.done]  # a row done a step ago: this token came too late
        for r, c in owners:
            if c.job.cancelled:
                c.done, c.reason = True, "cancelled"
                self._leave(c)
        owners = [(r, c) for r, c in owners if not c.done]
        rows = np.array([r for r, _ in owners], np.int32)
        tokens = out["token"][rows]
        new, n, done = decode.finish(tokens, np.array([c.n for _, c in owners], np.int32),
                                     np.zeros(len(owners), bool), np.array([c.row.max_new for _, c in owners]), EOT)
        for i, (r, c) in enumerate(owners):
            c.n = int(n[i])
            scores = {name: x[r] for name, x in out.items()} if c.k is not None else None
            delta, entry = c.add(int(tokens[i]), new[i], done[i], scores)
            if c.job.stream and (delta or entry or c.done):
                rest = c.text.flush() if c.done else ""
                c.job.events.put(("chunk", {"index": c.index, "text": delta + rest, "logprobs": entry,
                                            "finish_reason": c.reason}))
        for r, c in owners:
            if c.done:
                self._leave(c)

    def _leave(self, c):
        self.rows[self.rows.index(c)] = None
        self._finished(c)

    def _finished(self, c):
        """A choice is done; once all of its job's are, their texts complete, the job's handler is told, once."""
        job = c.job
        if job.answered or not all(x.done for x in job.choices):
            return
        if not job.stream:
            for x in job.choices:
                x.text.flush()
        job.answered = True
        job.events.put(("done",))

    def iterate(self):
        """Admit, queue a step, then read what was queued before it."""
        self.admit()
        ahead = self.step()
        ready, self.pending = self.pending, [ahead] if ahead else []
        for out, owners in ready:
            self.read(out, owners)
        if not self.busy():
            self.cache, self.rows, self.steps = None, [], np.zeros(0, np.int32)  # idle: start afresh

    def fail(self, message):
        """Tell every request in flight, and start afresh."""
        jobs = {id(c.job): c.job for c in self.waiting + self.admitting + [c for c in self.rows if c] +
                [c for _, owners in self.pending for _, c in owners]}
        for job in jobs.values():
            if not all(c.done for c in job.choices):
                job.events.put(("error", message))
            for c in job.choices:
                c.done = True
        self.rows, self.steps, self.waiting, self.admitting, self.pending = [], np.zeros(0, np.int32), [], [], []
        self.cache, self.cache_len = None, 0


# ---------------------------------------------------------------- HTTP

class Server(ThreadingHTTPServer):
    """Handler threads queue jobs; one model thread (`Engine`) runs them all."""
    daemon_threads = False  # so that server_close() waits for the requests in flight
    request_queue_size = 1024  # connections waiting to be accepted: the default 5 resets a crowd's

    def __init__(self, address, params, cfg, *, mesh=None, enc=None, slots=16, model_name="gpt-j", allow_origin=()):
        super().__init__(address, _Handler)
        self.cfg, self.enc, self.model_name = cfg, enc or data.tokenizer(), model_name
        self.allow_origin = set(allow_origin)  # other sites' pages that may call the API from a browser
        self.loopback = ipaddress.ip_address(socket.gethostbyname(address[0])).is_loopback
        self.engine = Engine(params, cfg, mesh, slots, self.enc)
        self.jobs = queue.Queue()
        self.created = int(time.time())
        self.worker = threading.Thread(target=self._work, name="model", daemon=True)
        self.loop = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no server error
            super().handle_error(request, client_address)

    def close(self):
        """Stop accepting, finish the requests in flight, then stop the model thread."""
        self.shutdown()
        self.server_close()
        self.jobs.put(None)
        self.worker.join()

    def _work(self):
        engine, stopping = self.engine, False
        while not stopping or engine.busy() or not self.jobs.empty():
            jobs = []
            try:
                while True:  # wait for work only when there is nothing to do
                    job = self.jobs.get(block=not engine.busy() and not jobs and not stopping)
                    if job is None:
                        stopping = True
                    else:
                        jobs.append(job)
            except queue.Empty:
                pass
            try:
                if jobs:
                    engine.accept(jobs)
                engine.iterate()
            except Exception as e:  # tell the clients, keep serving
                for job in jobs:
                    for c in job.choices:
                        c.done = True
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                engine.fail(f"generation failed: {type(e).__name__}: {e}")

    def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "gptj-jax", "root": self.model_name,
                                            "max_model_len": self.cfg.n_ctx}]}


class _Handler(BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may stall mid-request, so that a dead one cannot hold up shutdown

    def do_GET(self):
        if not self._host_ok():
            return
        if self.path in ("/", "/index.html"):
            return self._send_page()
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self._send(200, self.server.models())
        if self.path == "/tokenizer_info":
            return self._send(200, {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
                                    "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": None,
                                    "model_max_length": self.server.cfg.n_ctx})
        self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_OPTIONS(self):
        """A browser's CORS preflight: answered only for an origin that --allow_origin names."""
        if not self._host_ok():
            return
        origin = self.headers.get("Origin")
        if origin not in self.server.allow_origin:
            return self._send(403, {"error": f"cross-origin requests from {origin} are not allowed: start the server "
                                             f"with --allow_origin {origin} to allow them"})
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cors(self):
        origin = self.headers.get("Origin")
        if origin in self.server.allow_origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _send_page(self):
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # The page may talk to this server only, and nothing may frame it.
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src "
                         "'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _host_ok(self):
        """DNS rebinding: a page elsewhere can give its own name the address 127.0.0.1 and so call a server on
        loopback as its own origin. A server bound to loopback answers only requests made to a loopback name."""
        host = _hostname(self.headers.get("Host") or "").lower()
        if not self.server.loopback or host in ("localhost", "[::1]") or host.startswith("127."):
            return True
        self._send(403, {"error": f"Host {host!r} is not a loopback name: open the server as "
                                  f"http://127.0.0.1:{self.server.server_address[1]}/, or start it with --host"})
        return False

    def do_POST(self):
        if not self._host_ok():
            return
        routes = {"/v1/completions": self._completions, "/tokenize": self._tokenize, "/detokenize": self._detokenize}
        if self.path not in routes:
            return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(f"Content-Length {length} is negative")
            if length > MAX_BODY:
                self.close_connection = True  # the body is not read
                return self._send(413, {"error": f"a body of {length} bytes is over the limit of {MAX_BODY}"})
            body = self.rfile.read(length)
            if self.headers.get_content_type() != "application/json":
                return self._send(415, {"error": f"send the body as Content-Type: application/json, not "
                                                 f"{self.headers.get_content_type()}"})
            return routes[self.path](body)
        except ValueError as e:
            return self._send(400, {"error": str(e)})

    def _fields(self, body, allowed):
        try:
            req = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"malformed JSON: {e}") from None
        if not isinstance(req, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(req) - set(allowed) - {"model"}
        if unknown:
            raise ValueError(f"unknown field '{sorted(unknown)[0]}'")
        return req

    def _tokenize(self, body):
        req = self._fields(body, ("prompt", "add_special_tokens"))
        if not isinstance(req.get("prompt"), str):
            raise ValueError("'prompt' must be a string")
        if not isinstance(req.get("add_special_tokens", False), bool):
            raise ValueError("'add_special_tokens' must be true or false")
        # GPT-2's tokenizer adds no special tokens either way; <|endoftext|> in the text is that token.
        tokens = self.server.enc.encode(req["prompt"], allowed_special={"<|endoftext|>"})
        self._send(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.server.cfg.n_ctx})

    def _detokenize(self, body):
        req = self._fields(body, ("tokens",))
        tokens = req.get("tokens")
        n = self.server.cfg.n_vocab
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n
                                                   for t in tokens):
            raise ValueError(f"'tokens' must be a list of token ids in [0, {n})")
        text = b"".join(decode.token_bytes(self.server.enc, t) for t in tokens).decode("utf-8", "replace")
        self._send(200, {"prompt": text})

    def _completions(self, body):
        job = parse(body, self.server.cfg, self.server.enc)
        self.server.jobs.put(job)
        head = {"id": f"cmpl-{os.urandom(12).hex()}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        if job.stream:
            return self._stream(job, head)
        kind, *rest = job.events.get()
        if kind == "error":
            return self._send(500, {"error": rest[0]})
        self._send(200, {**head, "choices": [c.result() for c in job.choices], "usage": job.usage()})

    def _stream(self, job, head):
        self.send_response(200)
        self._cors()
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            while True:
                kind, *rest = job.events.get()
                # Everything already waiting goes out in one write: a client that fell behind catches up.
                events = [(kind, *rest)] + list(iter(lambda: _next(job.events), None))
                out, end = [], False
                for kind, *rest in events:
                    if kind == "chunk":
                        out.append({**head, "choices": [rest[0]]})
                        continue
                    if kind == "error":
                        out.append({"error": rest[0]})
                    elif job.usage_chunk:
                        out.append({**head, "choices": [], "usage": job.usage()})
                    end = True
                    break
                self.wfile.write("".join(f"data: {json.dumps(x)}\n\n" for x in out).encode() +
                                 (b"data: [DONE]\n\n" if end else b""))
                self.wfile.flush()
                if end:
                    break
        except OSError:  # the client went away: stop generating for it
            job.cancelled = True

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _hostname(header):
    """The name in a Host header, without its port."""
    return header[:header.find("]") + 1] if header.startswith("[") else header.rsplit(":", 1)[0]


def _next(events):
    try:
        return events.get_nowait()
    except queue.Empty:
        return None


def serve(params, cfg, host="127.0.0.1", port=8000, **kw) -> Server:
    """Start the server in background threads; `.close()` stops it cleanly."""
    server = Server((host, port), params, cfg, **kw)
    server.worker.start()
    server.loop.start()
    return server

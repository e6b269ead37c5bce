"""OpenAI's completions API as vLLM serves it, without the HTTP: a request body checked and turned into a `Job`
of `Choice`s (decoding rows), each choice's text, logprobs and finish reason as its tokens arrive, and the
tokenizer endpoints' answers. serve_engine.py generates the choices; serve.py carries them over HTTP."""
import dataclasses
import json
import os
import queue

import decode
import sampling

MAX_ROWS = 1024  # completions per request, prompts x n: they queue for the batch's slots
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


def read_json(body: bytes, allowed, required=None, unsupported=None) -> dict:
    """Every endpoint's body: a JSON object of allowed fields (and IGNORED ones), with `required` among them; a
    field of `unsupported` only with a value that asks nothing. ValueError names the first problem."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(req, dict) or (required and required not in req):
        raise ValueError("the body must be a JSON object" + (f" with a '{required}'" if required else ""))
    for name, value in req.items():
        if name in (unsupported or {}):
            what, neutral = unsupported[name]
            neutral = neutral + [req.get("n", 1)] * (name == "best_of")  # best_of == n: the n samples themselves
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
                raise ValueError(f"'{name}' is not supported here: {what}")
        elif name not in set(allowed) | IGNORED:
            raise ValueError(f"unknown field '{name}'")
    return req


def parse(body: bytes, cfg, enc) -> Job:
    """A completions request checked and turned into choices; ValueError names the first problem."""
    req = read_json(body, FIELDS, "prompt", UNSUPPORTED)

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
        k = number("logprobs", 0, True, lambda v: 0 <= v <= sampling.MAX_LOGPROBS,
                   f"an integer in [0, {sampling.MAX_LOGPROBS}] or null")
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
                             bias, k)
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


def tokenize(body, enc, cfg) -> dict:
    """POST /tokenize, as vLLM answers it."""
    req = read_json(body, ("prompt", "add_special_tokens"))
    if not isinstance(req.get("prompt"), str):
        raise ValueError("'prompt' must be a string")
    if not isinstance(req.get("add_special_tokens", False), bool):
        raise ValueError("'add_special_tokens' must be true or false")
    # GPT-2's tokenizer adds no special tokens either way; <|endoftext|> in the text is that token.
    tokens = enc.encode(req["prompt"], allowed_special={"<|endoftext|>"})
    return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.n_ctx}


def detokenize(body, enc, cfg) -> dict:
    """POST /detokenize, as vLLM answers it."""
    tokens = read_json(body, ("tokens",)).get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < cfg.n_vocab
                                               for t in tokens):
        raise ValueError(f"'tokens' must be a list of token ids in [0, {cfg.n_vocab})")
    return {"prompt": b"".join(decode.token_bytes(enc, t) for t in tokens).decode("utf-8", "replace")}


def tokenizer_info(cfg) -> dict:
    """GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer needs."""
    return {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": None, "model_max_length": cfg.n_ctx}


def models(name, created, cfg) -> dict:
    """GET /v1/models: the one model served."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "gptj-jax",
                                        "root": name, "max_model_len": cfg.n_ctx}]}

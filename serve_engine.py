"""The batching engine behind serve.py: continuous batching of completions' rows on one model thread.

The engine keeps a decode.Batch of up to `slots` rows decoding, a few steps of all of them per compiled call
(decode.step, as many as decode.Pace says); before every call the requests that arrived are prefilled together
and join the batch in free rows, and rows that finished leave it, so a request never waits for other requests to
finish. The batch has as many rows as are running (a power of 4) and the cache as many slots per row as the
longest may need (n_ctx over a power of 4), grown when that is not enough: a request alone decodes as a batch of one.
`compile_all` compiles every program those shapes need before the server answers, so no request waits for one.
"""
import concurrent.futures
import math
import os
import sys
import time
from functools import partial

import jax
import numpy as np

import data
import decode
import sampling
import score

PREFILL_TOKENS = 4096  # prompt tokens prefilled at once, padding included; at least one prompt
ECHO_BATCH = 8  # echoed prompts scored at once


class Engine:
    """Continuous batching: a batch of up to `slots` rows that requests' rows join and leave between calls.

    Each call is queued before the previous one's tokens are read on the host, so the device never waits for
    Python; a row that the host ends (a stop string, a client gone) is dropped one call late, harmlessly. Rows
    end on the device as decode.finish says, mid-call or not.
    """

    def __init__(self, params, cfg, mesh, slots, chunk=decode.CHUNK):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.slots = decode.batch_rows(slots, mesh)  # the most rows decoding at once
        self.rows = []  # the protocol's Choice in each row of the batch, or None
        self.batch = None  # the decode.Batch on the device
        self.waiting = []  # choices admitted but not yet in the batch
        self.admitting = []  # choices on their way into it
        self.pending = []  # (device outputs, [(output row, choice)], batch size; None: a prefill's) not yet read
        self.steps_run, self.calls = 0, 0  # decoding steps read back, and the calls of decode.step that ran them
        self.layouts = []  # each (rows, cache slots) the batch has had
        self.max_cache = decode.bucket(cfg.n_ctx)
        # Cache lengths: n_ctx (bucketed) over powers of 4, those of at least 64 slots, and a quarter of n_ctx (at
        # least a bucketed prompt's 16): 256: 64, 256; 2048: 128, 512, 2048; 64: 16, 64. Few, so that few programs
        # are compiled: a step's length costs little here (32 rows over 256 slots: 10% more than over 16).
        self.lengths = sorted({self.max_cache, max(decode.bucket(1), self.max_cache >> 2)} |
                              {self.max_cache >> 2 * i for i in range(2, 8) if self.max_cache >> 2 * i >= 64})
        self.pace = decode.Pace(chunk)

    def _size(self, n):
        """Rows for a batch of n: a power of 4 (1, 4, 16, ...), at most `slots`, that the mesh's dp divides.
        Few sizes, so that the prefill, step and regrouping programs a crowd meets are few."""
        return min(self.slots, decode.batch_rows(4 ** math.ceil(math.log(max(n, 1), 4) - 1e-9), self.mesh))

    def _length(self, n):
        """Cache slots for rows that need n: the shortest of `lengths` that holds them, at most the longest."""
        return next((x for x in self.lengths if x >= n), self.max_cache)

    def busy(self):
        return bool(self.waiting or self.pending or any(self.rows))

    def accept(self, jobs):
        """New requests: their echoed prompts scored now, their rows queued for the batch."""
        echo = [c for job in jobs for c in job.choices if c.echo]
        scored = [c for c in echo if c.k is not None]
        scores = score.token_scores(self.params, self.cfg, [c.row.ids for c in scored], mesh=self.mesh,
                                    batch_size=ECHO_BATCH, k=_echo_k(max(c.k for c in scored))) if scored else []
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

    def _group(self, running):
        """The waiting rows to prefill now: as many as fit, within a budget of prefilled tokens (padding
        included), since a long prefill would stall the running rows, and take memory."""
        room, longest, new = self.slots - len(running), 0, []
        for c in self.waiting[:room]:
            longest = max(longest, len(c.row.ids))
            if new and self._size(len(new) + 1) * decode.bucket(longest) > PREFILL_TOKENS:
                break
            new.append(c)
        return new

    def admit(self):
        """Prefill waiting rows, as one batch, into free rows of the running batch."""
        self.waiting = [c for c in self.waiting if not c.job.cancelled]
        running = [c for c in self.rows if c is not None]
        new = self._group(running)
        self.waiting = self.waiting[len(new):]
        if not new:
            return
        self.admitting = new  # until they are in the batch: a failure on the way must still answer them
        self._fit(running + new)
        size = self._size(len(new))
        rows = [c.row for c in new] + [decode.Row([data.EOT], 1)] * (size - len(new))
        tokens, lengths = decode.pack_prompts([r.ids for r in rows], size)
        # The prompts into a cache of one of the batch's lengths, then their first tokens: one step of these rows.
        fresh = decode.fill(self.params, tokens, lengths, *self._row_inputs(rows), self.cfg,
                            self._length(tokens.shape[1]), self.mesh)
        out, fresh = decode.first_step(self.params, fresh, np.ones(size, bool), np.int32(1), self.cfg, self.mesh)
        free = [b for b, c in enumerate(self.rows) if c is None]
        for i, c in enumerate(new):
            piece = decode.row_of(fresh, np.int32(i), mesh=self.mesh)
            self.batch = decode.insert(self.batch, piece, np.array([free[i]], np.int32), mesh=self.mesh)
            self.rows[free[i]] = c
        self.pending.append((out, list(enumerate(new)), None))
        self.admitting = []
        self.pace.restart()

    def _row_inputs(self, rows):
        """fill's per-row inputs: the knobs on the device, each row's budget, and the token that ends it."""
        return (decode.put(decode.knobs(rows, self.cfg.n_vocab), self.mesh), np.array([r.max_new for r in rows],
                                                                                       np.int32),
                np.full(len(rows), data.EOT, np.int32))

    def _fit(self, choices):
        """Room in the batch and its cache for these rows. Both are sized by powers of 4 (the batch rounded to the
        mesh's dp), so that only a few shapes are ever compiled, and a lone request decodes as a batch of one.
        They grow as rows need and stay so while any row runs; once all have left, the next request starts
        afresh. (Shrinking as rows leave would meet ever new pairs of shapes to compile.)"""
        size = self._size(len(choices))
        length = self._length(max(len(c.row.ids) + c.row.max_new for c in choices))
        if self.batch is None:
            self.batch = decode.empty(self.cfg, size, length, self.params, self.mesh)
            self.rows = [None] * size
            self.layouts.append((size, length))
            return
        # Grown one size at a time (rows, then slots), so that only neighbouring sizes are ever regrouped.
        while self.batch.size < size or self.batch.cache_len < length:
            rows, slots = self._grown(self.batch.size, self.batch.cache_len, size)
            order = np.arange(rows, dtype=np.int32)  # the rows where they are, then empty ones
            self.batch = decode.regroup(self.batch, order, slots, mesh=self.mesh)
            self.rows += [None] * (rows - len(self.rows))
            self.layouts.append((rows, slots))

    def _grown(self, rows, slots, wanted):
        """The next (rows, slots) from (rows, slots) on the way to `wanted` rows: first rows, then slots."""
        if rows < wanted:
            return self._size(rows * 4), slots
        return rows, self._length(slots + 1)

    def step(self):
        """Queue a few steps of every running row."""
        active = np.array([c is not None and not c.done for c in self.rows])
        if not active.any():
            return None
        # Without room for another row (all taken, none waiting) no one is kept waiting by a longer call.
        room = bool(self.waiting) or self.batch.size < self.slots or not all(c is not None and not c.done
                                                                            for c in self.rows)
        k = self.pace.next(self.batch.size, room)
        out, self.batch = decode.step(self.params, self.batch, active, np.int32(k), self.cfg, self.mesh)
        return out, [(b, c) for b, c in enumerate(self.rows) if active[b]], self.batch.size

    def read(self, out, owners, size):
        """Tokens back on the host, a column per step: each row's text and logprobs to its client; a row ends at
        the token that ends it, and finished rows leave."""
        tok, made = np.asarray(out["token"]), np.asarray(out["made"])
        if size is None:  # a prefill: the next call's time starts here
            self.pace.read(None, 0)
        else:
            self.steps_run, self.calls = self.steps_run + int(made.max(initial=0)), self.calls + 1
            self.pace.read(size, int(made.max(initial=0)))
        owners = [(r, c) for r, c in owners if not c.done]  # a row done a call ago: these tokens came too late
        for r, c in owners:
            if c.job.cancelled:
                c.done, c.reason = True, "cancelled"
                self._leave(c)
        owners = [(r, c) for r, c in owners if not c.done]
        scores = {name: np.asarray(out[name]) for name in ("logprob", "top_ids", "top_logprobs")} \
            if any(c.k is not None for _, c in owners) else {}
        chunks = {}  # each streaming row's text and logprobs from this call: one event, however many tokens
        for i in range(tok.shape[1]):
            live = [(r, c) for r, c in owners if not c.done and made[r] > i]
            if not live:
                break
            rows = np.array([r for r, _ in live], np.int32)
            new, n, done = decode.finish(tok[rows, i], np.array([c.n for _, c in live], np.int32),
                                         np.zeros(len(live), bool), np.array([c.row.max_new for _, c in live]), data.EOT)
            for j, (r, c) in enumerate(live):
                c.n = int(n[j])
                entry = {name: x[r, i] for name, x in scores.items()} if c.k is not None else None
                delta, entry = c.add(int(tok[r, i]), new[j], done[j], entry)
                if c.job.stream and (delta or entry or c.done):
                    text, lp = chunks.get(c, ("", None))
                    lp = entry if lp is None else {name: lp[name] + entry[name] for name in lp}
                    chunks[c] = (text + delta + (c.text.flush() if c.done else ""), lp)
        for c, (text, lp) in chunks.items():
            c.job.events.put(("chunk", {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.reason}))
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
        """Admit, queue a call, then read what was queued before it."""
        self.admit()
        ahead = self.step()
        ready, self.pending = self.pending, [ahead] if ahead else []
        for out, owners, size in ready:
            self.read(out, owners, size)
        if not self.busy():
            self.batch, self.rows = None, []  # idle: start afresh
            self.pace.idle()

    def fail(self, message):
        """Tell every request in flight, and start afresh."""
        jobs = {id(c.job): c.job for c in self.waiting + self.admitting + [c for c in self.rows if c] +
                [c for _, owners, _ in self.pending for _, c in owners]}
        for job in jobs.values():
            if not all(c.done for c in job.choices):
                job.events.put(("error", message))
            for c in job.choices:
                c.done = True
        self.rows, self.waiting, self.admitting, self.pending, self.batch = [], [], [], [], None
        self.pace.idle()

    # ------------------------------------------------------------ compiling before serving

    def shapes(self) -> dict:
        """Every shape of every program the engine can meet: {program: [shape, ...]}. step: (rows, cache length);
        fill: (group size, prompt length), its cache the shortest length that holds the prompt, its first step a
        step's shape; row_of: (group size, cache length); insert: (rows, cache length, the row's cache length);
        regroup: (rows, length) to (rows, length); echo: the prompt's length."""
        sizes = sorted({self._size(n) for n in range(1, self.slots + 1)})
        lengths = self.lengths
        buckets = [decode.bucket(2) << i for i in range(int(math.log2(self.max_cache // decode.bucket(2))) + 1)]
        prompts = [t for t in buckets if t <= decode.bucket(self.cfg.n_ctx - 1)]  # a prompt leaves a token's room
        groups = [(p, t) for p in sizes for t in prompts if p == self._size(1) or p * t <= PREFILL_TOKENS]
        # The batch grows one size at a time: rows (to the next size), or slots (the next length).
        regroup = [(b, l, self._size(4 * b), l) for b in sizes for l in lengths if b < self.slots] + \
            [(b, l, b, self._length(l + 1)) for b in sizes for l in lengths if l < self.max_cache]
        return {"step": [(b, l) for b in sizes for l in lengths], "fill": groups,
                "row_of": sorted({(p, self._length(t)) for p, t in groups}),
                "insert": [(b, l, r) for b in sizes for l in lengths for r in lengths if r <= l],
                "regroup": regroup, "echo": buckets}

    def compile_all(self, log=sys.stderr, workers=None) -> float:
        """Compile every program of every shape in `shapes()`, a few at once (XLA compiles on the host, with more
        than one thread each: by default one compile per two cores), with a progress line on `log`; -> the seconds
        it took. With JAX's persistent compilation cache (sample.py --compile_cache), a restarted server reads them
        back instead."""
        start, shapes = time.perf_counter(), self.shapes()
        jobs = []  # (name, a function that compiles it)
        lower = lambda fn, *a, **kw: lambda: fn.lower(*a, **kw).compile()

        def abstract(batch):  # a Batch's shapes, with the shardings of traffic's (decode.layout; none on one device)
            if self.mesh is None:
                return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                                decode.layout(batch, self.mesh))
        batches = {}
        for b, l in shapes["step"]:  # each made for real (its zeros compiled too), one at a time, then only its shape
            batches[b, l] = abstract(decode.empty(self.cfg, b, l, self.params, self.mesh))
            jobs.append(lower(decode.step, self.params, batches[b, l], np.ones(b, bool), np.int32(1), self.cfg,
                              self.mesh))
        for p, t in shapes["fill"]:
            jobs.append(lower(decode.fill, self.params, *self._fill_inputs(p, t), self.cfg, self._length(t), self.mesh))
        fresh = {(p, l): abstract(jax.eval_shape(lambda p=p, l=l: decode.fill(
            self.params, *self._fill_inputs(p, l), self.cfg, l, self.mesh))) for p, l in shapes["row_of"]}
        for p, l in shapes["row_of"]:
            jobs.append(lower(decode.row_of, fresh[p, l], np.int32(0), mesh=self.mesh))
        one = {l: abstract(jax.eval_shape(partial(decode.row_of, mesh=self.mesh), fresh[self._size(1), l], np.int32(0)))
               for l in {r for _, _, r in shapes["insert"]}}
        for b, l, r in shapes["insert"]:
            jobs.append(lower(decode.insert, batches[b, l], one[r], np.array([0], np.int32), mesh=self.mesh))
        for b, l, b2, l2 in shapes["regroup"]:
            jobs.append(lower(decode.regroup, batches[b, l], np.arange(b2, dtype=np.int32), l2, mesh=self.mesh))
        for t in shapes["echo"]:  # lm-evaluation-harness's echoed prompts (logprobs 1); other k compile when met
            seqs = np.zeros((decode.batch_rows(ECHO_BATCH, self.mesh), min(t, self.cfg.n_ctx) + 1), np.int32)
            jobs.append(lower(score.batch_scores, self.params, seqs, self.cfg, self.mesh, 1))
        done = 0
        # On this 2-core machine 62 programs took 44 s one at a time, 58 s two at a time.
        with concurrent.futures.ThreadPoolExecutor(workers or max(1, (os.cpu_count() or 1) // 2)) as pool:
            for future in concurrent.futures.as_completed([pool.submit(job) for job in jobs]):
                future.result()
                done += 1
                if log and (done % 10 == 0 or done == len(jobs)):
                    print(f"compiling: {done}/{len(jobs)} programs, {time.perf_counter() - start:.1f} s",
                          file=log, flush=True)
        self._first_calls(shapes)
        if log:
            print(f"compiling: each program called once, {time.perf_counter() - start:.1f} s", file=log, flush=True)
        return time.perf_counter() - start

    def _fill_inputs(self, p, t):
        """fill's inputs for a group of p one-token prompts padded to t tokens, as traffic passes them."""
        tokens, lengths = decode.pack_prompts([[data.EOT] * t], p)
        return (tokens, lengths, *self._row_inputs([decode.Row([data.EOT], 1)] * p))

    def _first_calls(self, shapes):
        """Call every program once, on zeros, as traffic calls it: what compiling left to the first call (tracing,
        lowering, finding the compiled program) is done here too. One batch at a time, so that memory peaks at
        the largest batch, which traffic may fill anyway."""
        pieces = {}
        for p, t in shapes["fill"]:
            fresh = decode.fill(self.params, *self._fill_inputs(p, t), self.cfg, self._length(t), self.mesh)
            _, fresh = decode.first_step(self.params, fresh, np.ones(p, bool), np.int32(1), self.cfg, self.mesh)
            pieces[self._length(t)] = decode.row_of(fresh, np.int32(0), mesh=self.mesh)
        for b, l in shapes["step"]:
            batch = decode.empty(self.cfg, b, l, self.params, self.mesh)
            for b_, l_, b2, l2 in shapes["regroup"]:
                if (b_, l_) == (b, l):
                    decode.regroup(batch, np.arange(b2, dtype=np.int32), l2, mesh=self.mesh)
            for b_, l_, r in shapes["insert"]:
                if (b_, l_) == (b, l):
                    batch = decode.insert(batch, pieces[r], np.array([b], np.int32), mesh=self.mesh)  # dropped
            jax.block_until_ready(decode.step(self.params, batch, np.zeros(b, bool), np.int32(1), self.cfg, self.mesh))
        for t in shapes["echo"]:
            seqs = np.zeros((decode.batch_rows(ECHO_BATCH, self.mesh), min(t, self.cfg.n_ctx) + 1), np.int32)
            jax.block_until_ready(score.batch_scores(self.params, seqs, self.cfg, self.mesh, 1))


def _echo_k(k):
    """How many alternatives to score echoed prompts with, when k are wanted: 0, 1 or all (few programs)."""
    return k if k <= 1 else sampling.MAX_LOGPROBS

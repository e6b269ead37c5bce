"""The decoding step's cost by batch size: what bounds the server's latency under load against a request alone.

    python bench/step.py                                  # small preset, 1 and 32 rows, 256 cache slots
    python bench/step.py --preset tiny --rows 1 4 --slots 64 --calls 4
    python bench/step.py --dtype bfloat16                 # weights and compute in bf16, as on accelerators

Each size runs decode.step in calls of --k steps, as the server does with a full batch (every row sampling at
temperature 0.8 with a logit bias, as bench/load.py's requests do, prompts of 15 tokens), and prints one JSON line:
milliseconds a step (the best and the median call over --calls, after one unmeasured call), and each size's best
against the first size's (`vs_first`). A request alone decodes as a batch of one and a crowd of 32 as a batch of 32,
so the server's latency under load against alone (bench/load.py) cannot beat this ratio.

What bounds that ratio from below on a CPU: `head_ms`, each size's output projection alone (the [rows, d_model]
by [d_model, n_vocab] product and its bias, compiled as the step computes it, the best of --calls runs of 16), and
`matmul_gflops`, the machine's float32 matmul rate (a 1024-square product, the best of 5). At one row the
projection is bound by reading its weights; at 32 it does 32x the arithmetic, which no layout hides.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's own files
import runtime  # noqa: E402


def best_ms(f, runs, *args, reps=16):
    """The best of `runs` timings of `reps` calls of f(*args), in ms a call, after one unmeasured call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(reps):
            res = f(*args)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - start) / reps * 1e3)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--slots", type=int, default=256, help="cache slots a row")
    p.add_argument("--k", type=int, default=16, help="steps a call (decode.CHUNK at most)")
    p.add_argument("--calls", type=int, default=8, help="measured calls a size")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute")
    args = p.parse_args(argv)
    runtime.keep_freed_host_memory()  # as sample.py does, before JAX starts its threads
    import decode
    import gptj
    cfg = dataclasses.replace(gptj.PRESETS[args.preset], dtype=args.dtype)
    prompt = 15
    if prompt + 1 + args.k * (args.calls + 1) > min(args.slots, cfg.n_ctx):
        sys.exit(f"error: {args.calls + 1} calls of {args.k} steps after a {prompt}-token prompt do not fit "
                 f"{min(args.slots, cfg.n_ctx)} cache slots: ask for fewer --calls or --k, or more --slots")
    params = jax.tree.map(lambda x: x.astype(cfg.dtype), gptj.init_params(cfg, jax.random.PRNGKey(0)))
    params = decode.unstack(decode.place(params), free=True)
    out = {"preset": args.preset, "dtype": args.dtype, "device": jax.devices()[0].device_kind, "slots": args.slots,
           "k": args.k, "ms_per_step": {}}
    for b in args.rows:
        rows = [decode.Row(list(range(1, prompt + 1)), 10_000, temperature=0.8, key=(i, 0), bias={50256: -100})
                for i in range(b)]
        tokens, lengths = decode.pack_prompts([r.ids for r in rows], b)
        batch = decode.fill(params, tokens, lengths, decode.put(decode.knobs(rows, cfg.n_vocab)),
                            np.full(b, 10_000, np.int32), np.full(b, -1, np.int32), cfg, args.slots, None)
        times, active = [], np.ones(b, bool)
        for _ in range(args.calls + 1):
            start = time.perf_counter()
            res, batch = decode.step(params, batch, active, np.int32(args.k), cfg, None)
            jax.block_until_ready(res)
            times.append((time.perf_counter() - start) / args.k * 1e3)
        out["ms_per_step"][b] = {"best": round(min(times[1:]), 3), "median": round(float(np.median(times[1:])), 3)}
    first = out["ms_per_step"][args.rows[0]]["best"]
    out["vs_first"] = {b: round(m["best"] / first, 2) for b, m in out["ms_per_step"].items()}
    head = params["lm_head"]
    project = jax.jit(lambda x, w, bias: jnp.dot(x, w, preferred_element_type=jnp.float32) + bias)
    out["head_ms"] = {b: round(best_ms(project, args.calls, jnp.ones((b, cfg.d_model), cfg.dtype), head["weight"],
                                       head["bias"]), 3) for b in args.rows}
    n = 1024
    square = jnp.ones((n, n), jnp.float32)
    out["matmul_gflops"] = round(2 * n ** 3 / best_ms(jax.jit(jnp.matmul), 5, square, square, reps=1) / 1e6, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

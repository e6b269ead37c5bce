"""The decoding step's cost by batch size: what bounds the server's latency under load against a request alone.

    python bench/step.py                                  # small preset, 1 and 32 rows, 256 cache slots
    python bench/step.py --preset tiny --rows 1 4 --slots 64 --calls 4

Each size runs decode.step in calls of --k steps, as the server does with a full batch (every row sampling at
temperature 0.8 with a logit bias, as bench/load.py's requests do, prompts of 15 tokens), and prints one JSON line:
milliseconds a step (the best and the median call over --calls, after one unmeasured call), and each size's best
against the first size's (`vs_first`). A request alone decodes as a batch of one and a crowd of 32 as a batch of 32,
so the server's latency under load against alone (bench/load.py) cannot beat this ratio.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's own files
import runtime  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--slots", type=int, default=256, help="cache slots a row")
    p.add_argument("--k", type=int, default=16, help="steps a call (decode.CHUNK at most)")
    p.add_argument("--calls", type=int, default=8, help="measured calls a size")
    args = p.parse_args(argv)
    runtime.keep_freed_host_memory()  # as sample.py does, before JAX starts its threads
    import decode
    import gptj
    cfg = gptj.PRESETS[args.preset]
    prompt = 15
    if prompt + 1 + args.k * (args.calls + 1) > min(args.slots, cfg.n_ctx):
        sys.exit(f"error: {args.calls + 1} calls of {args.k} steps after a {prompt}-token prompt do not fit "
                 f"{min(args.slots, cfg.n_ctx)} cache slots: ask for fewer --calls or --k, or more --slots")
    params = decode.unstack(decode.place(gptj.init_params(cfg, jax.random.PRNGKey(0))), free=True)
    out = {"preset": args.preset, "device": jax.devices()[0].device_kind, "slots": args.slots, "k": args.k,
           "ms_per_step": {}}
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
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

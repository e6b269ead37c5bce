"""Generate, score, serve and benchmark GPT-J from the command line: decode.py decodes, score.py scores,
serve.py serves.

    python sample.py --prompt "To be, or not to be" [--greedy | --temperature 0.8 --top_p 0.9] [--json]
    python sample.py --score FILE | --lambada FILE.jsonl | --serve --port 8000 | --benchmark --preset small

Weights are held per layer (decode.unstack), so that each decoding step reads each weight once.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import data
import decode
import gptj
import perf
import score
import serve
import runtime
import shard

DEFAULT_RUN = "runs/shakespeare"


# ---------------------------------------------------------------- benchmark

def memory_bandwidth(nbytes=None) -> float:
    """The default device's read bandwidth in bytes/s: the best time to sum an array far larger than its caches."""
    nbytes = nbytes or (1 << 31 if jax.default_backend() == "gpu" else 1 << 28)
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / perf.best_time(lambda: total(x), 10)


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
    tokens, lengths, knobs, limit, steps = decode.pack(rows, mesh, n_vocab=cfg.n_vocab)
    knobs, eot = decode.put(knobs, mesh), np.full(len(tokens), -1, np.int32)
    t = time.perf_counter()
    prefill = decode.prefill.lower(params, tokens, lengths, knobs, limit, eot, cfg, tokens.shape[1] + steps,
                                   mesh).compile()
    loop = decode.generate.lower(params, tokens, lengths, knobs, limit, cfg, steps, mesh=mesh, eot=-1).compile()
    compile_s = time.perf_counter() - t
    prefill_s = perf.best_time(lambda: prefill(params, tokens, lengths, knobs, limit, eot))
    total_s = perf.best_time(lambda: loop(params, tokens, lengths, knobs, limit, eot=-1))
    decode_tps = batch * (max_new - 1) / max(total_s - prefill_s, 1e-9)
    # The path streaming and the server take: a few steps per compiled call (decode.Pace), each call's tokens back
    # on the host while the next runs.
    stream = lambda: decode.complete(params, cfg, rows, mesh=mesh, on_step=lambda *_: None, eot=-1)
    stream()  # compiles its prefill and step
    stream_s = perf.best_time(stream)
    # Each step reads every weight but the embedding table, of which it gathers only one row per sequence.
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wte"].nbytes
    bandwidth = memory_bandwidth()
    bound = batch * bandwidth * decode.mp(mesh) / weights  # each of mp devices reads its slice; padding rows add no tokens
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
    # On the device: weights left in host memory would be copied to it on every compiled call (every step).
    return decode.unstack(decode.place(params, mesh), free=True), cfg, mesh


def model_name(args) -> str:
    """The id /v1/models gives: the checkpoint's folder name (a run's, for a step folder in it), or the preset."""
    if args.preset:
        return f"gptj-{args.preset}"
    path = Path(args.checkpoint or DEFAULT_RUN).resolve()
    return path.parent.name if path.name.startswith("step_") else path.name


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
    p.add_argument("--batch_size", type=int, default=16,
                   help="rows generated or scored together; with --serve, the rows decoding at once")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, in prompt order")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--score", metavar="FILE", help="mean NLL per token of a text file")
    mode.add_argument("--lambada", metavar="FILE", help='LAMBADA accuracy and perplexity of a .jsonl of {"text"}')
    mode.add_argument("--serve", action="store_true", help="serve OpenAI's completions API (serve.py)")
    mode.add_argument("--benchmark", action="store_true", help="time prefill and decoding")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", help="the model's id in the API (default: from the checkpoint or preset)")
    p.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                   help="repeatable: a web origin (https://example.org) whose pages may call the API from a browser")
    p.add_argument("--lazy_compile", action="store_true",
                   help="with --serve: compile each shape when traffic first meets it, not all before serving")
    p.add_argument("--compile_cache", default=default_compile_cache(), metavar="DIR",
                   help="JAX's persistent compilation cache: compiled programs kept for the next run ('none': "
                        "off; default %(default)s)")
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


def default_compile_cache() -> str:
    """$JAX_COMPILATION_CACHE_DIR if set, else gptj-jax/xla in the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(base, "gptj-jax", "xla")


def use_compile_cache(path):
    """Keep every compiled program in `path` (JAX's persistent compilation cache), so that a restarted server or a
    repeated run reads them back instead of compiling again; 'none' turns the cache off. Before the first compile."""
    if path == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
    # Every program, however quick to compile: a server compiles many small ones before it serves.
    for name in ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes"):
        if name.upper() not in os.environ:
            jax.config.update(name, 0)


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
    use_compile_cache(args.compile_cache)
    params, cfg, mesh = load(args)
    kw = dict(mesh=mesh, batch_size=args.batch_size)
    if args.score:
        print(json.dumps(score.score_text(params, cfg, text, enc, **kw)), file=out)
    elif args.lambada:
        print(json.dumps(score.lambada(params, cfg, texts, enc, **kw)), file=out)
    elif args.benchmark:
        prompt = decode.prompt_ids(enc, args.prompt[0]) if args.prompt else None
        report = benchmark(params, cfg, args.num_samples, args.max_new_tokens, mesh=mesh, prompt=prompt)
        print(json.dumps(report), file=out)
    elif args.serve:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # before the line below: a client may act on it at once
        server = serve.serve(params, cfg, args.host, args.port, mesh=mesh, enc=enc, slots=args.batch_size,
                             model_name=args.model_name or model_name(args), allow_origin=args.allow_origin,
                             compile_all=not args.lazy_compile)
        while not server.ready.wait(0.5):  # /health answers 503 until then
            if stop.is_set():
                server.close()
                return
        if server.compile_s is not None:
            print(f"compiled every shape in {server.compile_s:.1f} s (cache: {args.compile_cache})", file=sys.stderr,
                  flush=True)
        print(f"serving http://{args.host}:{server.server_address[1]}/v1/completions (the playground: "
              f"http://{args.host}:{server.server_address[1]}/); SIGTERM or Ctrl-C stops", file=sys.stderr, flush=True)
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
    runtime.keep_freed_host_memory()  # before JAX starts its threads: the stepwise path allocates per token
    sys.exit(main())

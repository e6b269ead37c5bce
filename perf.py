"""Speed figures, measured one way everywhere: the FLOPs a training token costs, the matmul peak that MFU divides
by, how a call and a step are timed, and the JSON line of `train.py --benchmark`, which bench/flax_gptj.py prints
too. The measurements themselves, with their commands, are in docs/performance.md."""
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import gptj
import runtime


def flops_per_token(cfg: gptj.Config, seq: int, adapters: int = 0) -> float:
    """Training FLOPs per token: 6 per parameter plus attention. wte is left out: an embedding lookup multiplies
    nothing. (Counting it, the "6 x all parameters" often quoted, would credit a small model with a 50k vocab
    with half again the FLOPs it does.) With LoRA (`adapters` parameters), the frozen weights need no weight
    gradient: 4 FLOPs per base parameter (forward, and the activations' gradient), 6 per adapter parameter."""
    return ((4 if adapters else 6) * (cfg.n_params() - cfg.n_vocab * cfg.d_model) + 6 * adapters
            + 12 * cfg.n_layer * cfg.d_model * seq)


def best_time(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, each waited for (jax.block_until_ready on its
    result): the first call may compile, and on a shared machine the fastest is the least disturbed."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def _matmuls(platform, n):
    """Four chained n x n matmuls, compiled once per platform."""
    return jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, y: (y @ x) * (1 / n), x),
                   compiler_options=runtime.compiler_options(jax.devices(platform)[0]))


def matmul_peak(device, dtype, readings=4) -> float:
    """Measured FLOP/s of one device on large matmuls: MFU's denominator is this times the device count.
    Compiled with the training step's options, which on CPUs are also the faster ones for matmuls."""
    n = 1024 if device.platform == "cpu" else 8192
    f, x = _matmuls(device.platform, n), jax.device_put(jnp.ones((n, n), dtype), device)
    return 4 * 2 * n**3 / best_time(lambda: f(x), readings)


@functools.cache
def device_peak(device, dtype) -> float:
    """matmul_peak, read once per process and device: the runs of one process (tests start dozens) share it."""
    return matmul_peak(device, dtype)


def time_steps(step, state, batch, steps: int, warmup: int = 10):
    """Time a step function `state, metrics = step(state, batch)`: (seconds of the first call, compiling
    included; mean seconds of `steps` calls after `warmup` more). The warm-up lets a CPU's heap reach its
    high-water mark (see runtime.keep_freed_host_memory): until then a step can fault in fresh pages, and
    a short warm-up leaves some runs slower (docs/performance.md)."""
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return compile_s, (time.perf_counter() - start) / steps


def speed_record(flops_per_token: float, tokens_per_step: int, step_s: float, compile_s: float, peak: float,
                 devices: int) -> dict:
    """The --benchmark line; peak is the FLOP/s of all the devices together."""
    mfu = flops_per_token * tokens_per_step / step_s / peak
    return {"tokens_per_s": round(tokens_per_step / step_s, 1), "step_s": round(step_s, 4), "mfu": round(mfu, 4),
            "compile_s": round(compile_s, 2), "peak_flops": round(peak, -8), "devices": devices}


def benchmark(t, steps: int = 5) -> dict:
    """`train.py --benchmark`: time `steps` of the training step of `t` (a train.Trainer) on random tokens. The
    matmul peak is measured before and after them and the higher kept: on a shared CPU a single reading can be
    a third low, which would inflate mfu."""
    peak = matmul_peak(t.device, t.cfg.dtype)
    rng = np.random.default_rng(0)  # the same tokens on every process; each puts its own rows
    ids = min(t.cfg.n_vocab, data.EOT + 1)  # GPT-2's ids, or all of a smaller vocabulary's
    batch = t.global_batch(rng.integers(0, ids, t.batch_shape, dtype=np.int32)[:, t.rows])
    frozen = jax.jit(t.random_frozen, out_shardings=t.frozen_shardings)(jax.random.PRNGKey(1)) if t.lora else {}
    halt = t.halt(0)
    compile_s, step_s = time_steps(lambda s, b: t.step(s, b, frozen, halt), t.fresh_state(), batch, steps)
    peak = max(peak, matmul_peak(t.device, t.cfg.dtype)) * t.mesh.size
    record = speed_record(t.flops_per_token(), t.tokens_per_step(), step_s, compile_s, peak, t.mesh.size)
    return {**record, "device": t.device.device_kind, "dtype": t.cfg.dtype, "params": t.cfg.n_params()}

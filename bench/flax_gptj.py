"""The yardstick for `train.py --benchmark`: transformers' Flax GPT-J, timed the same way on the same shapes.

Flax models left transformers in version 5, so this runs in a venv of its own (not needed by anything else),
from the repository's root:
    python3 -m venv /tmp/flax && /tmp/flax/bin/pip install -r bench/requirements-flax.txt
    /tmp/flax/bin/python bench/flax_gptj.py --layers 4 --d_model 512 --n_heads 8 --pe_rotary_dims 32 --seq 256 \\
        --per_replica_batch 8
Prints the JSON line of `train.py --benchmark`, from the same timing code. The step is close to train.py's: clip
by global norm, AdamW, fp32, one device, no z-loss. Flax runs as its users would run it: without train.py's CPU
allocator and compiler settings (see docs/training.md).
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's own files
import config  # noqa: E402
import data  # noqa: E402
import perf  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = ("layers", "d_model", "n_heads", "pe_rotary_dims", "seq", "per_replica_batch", "n_vocab")
    for key in keys:
        ap.add_argument(f"--{key}", type=int, default=config.KEYS[key])
    ap.add_argument("--benchmark_steps", type=int, default=5)
    a = ap.parse_args()
    from transformers import FlaxGPTJForCausalLM, GPTJConfig  # transformers < 5 with flax

    model = FlaxGPTJForCausalLM(GPTJConfig(vocab_size=a.n_vocab, n_positions=a.seq, n_embd=a.d_model,
                                           n_layer=a.layers, n_head=a.n_heads, rotary_dim=a.pe_rotary_dims),
                                seed=0, dtype=jnp.float32)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))

    def loss(params, tokens):
        logits = model(tokens[:, :-1], params=params, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(state, tokens):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    device = jax.devices()[0]
    peak = perf.matmul_peak(device, "float32")
    ids = min(a.n_vocab, data.EOT + 1)  # GPT-2's ids, as train.py --benchmark draws them
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, ids, (a.per_replica_batch, a.seq + 1)), jnp.int32)
    state = (model.params, opt.init(model.params))
    compile_s, step_s = perf.time_steps(step, state, tokens, a.benchmark_steps)
    peak = max(peak, perf.matmul_peak(device, "float32"))
    cfg = config.Run(**{k: getattr(a, k) for k in keys}).model()  # the model train.py would count
    fpt = perf.flops_per_token(cfg, a.seq)
    print(json.dumps(perf.speed_record(fpt, a.per_replica_batch * a.seq, step_s, compile_s, peak, 1)))


if __name__ == "__main__":
    main()

"""Low-rank adapters (LoRA) for gptj.py: pure functions over adapter pytrees, no devices.

A targeted projection W [in, out] gains A [in, r] and B [r, out] and computes x W + (alpha / r) (x A) B beside the
frozen W (never merged while training: a merged weight would cost a full-size gradient per target and layer).
B starts at zero, so an untrained adapter is the base model exactly. Adapters sit next to the weight they adapt:
params["h"]["q_proj"] = {"weight": W, "lora_a": A, "lora_b": B}, stacked over layers like every layer param.
"""
import math

import jax
import jax.numpy as jnp

import gptj

# The projections LoRA may adapt, by their names in gptj.PARAMS (and in HuggingFace's GPT-J).
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


def check(cfg: gptj.Config, rank: int, targets) -> tuple:
    """The targets as a tuple, after checking them and the rank against the model; a ValueError names the problem."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora_targets {','.join(targets)!r}: each must be one of {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets {','.join(targets)!r} names a projection twice")
    shapes = gptj.param_shapes(cfg)
    for t in targets:
        d_in, d_out = shapes[f"h.{t}.weight"][-2:]
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(f"lora_rank={rank}: must be from 1 to {min(d_in, d_out)}, the smaller side of "
                             f"{t} [{d_in}, {d_out}]")
    return targets


def leaf_axes(name: str) -> tuple:
    """Logical axes of any leaf of a (possibly adapted) params tree: gptj.PARAMS's, and for an adapter those of the
    weight it adapts with a "lora_rank" axis for r: A keeps the weight's input axis, B its output axis."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("lora_a", "lora_b"):
        axes = gptj.PARAMS[f"{module}.weight"][0]
        return axes[:-1] + ("lora_rank",) if leaf == "lora_a" else axes[:-2] + ("lora_rank", axes[-1])
    return gptj.PARAMS[name][0]


def shapes(cfg: gptj.Config, rank: int, targets) -> dict:
    """{'h.q_proj.lora_a': (n_layer, d_model, r), ...} for the targets."""
    sizes = {**gptj.axis_sizes(cfg), "lora_rank": rank}
    names = [f"h.{t}.{leaf}" for t in targets for leaf in ("lora_a", "lora_b")]
    return {n: tuple(sizes[a] for a in leaf_axes(n)) for n in names}


def init_adapters(cfg: gptj.Config, rank: int, targets, key) -> dict:
    """fp32 adapters as PEFT initialises them: A uniform in +-1/sqrt(in) (kaiming-uniform with a = sqrt(5)), B zero."""
    table = shapes(cfg, rank, targets)
    keys = iter(jax.random.split(key, len(targets)))
    leaves = {}
    for name, shape in table.items():
        if name.endswith("lora_a"):
            bound = 1 / math.sqrt(shape[-2])
            leaves[name] = jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound)
        else:
            leaves[name] = jnp.zeros(shape, jnp.float32)
    return gptj.nest(leaves)


def combine(base: dict, adapters: dict) -> dict:
    """The params tree the model runs: the base tree with each adapter's leaves added beside the weight it adapts."""
    if not isinstance(base, dict):
        return base
    return {k: combine(v, adapters.get(k, {})) for k, v in base.items()} | {
        k: v for k, v in adapters.items() if k not in base}


def linear_fn(scale: float):
    """gptj's linear hook for adapted params: x W, plus scale * (x A) B where the params hold an adapter. With the
    weights split over mp the branch splits as W does, and joins W's partial sums before the layer's psum. The hook
    carries the adapters' axes (its leaf_axes), which shard's wrappers read to split params it is given with."""
    def linear(x, p):
        y = gptj.dense(x, p)
        if "lora_a" in p:
            y = y + ((x @ p["lora_a"].astype(x.dtype)) @ p["lora_b"].astype(x.dtype)) * jnp.asarray(scale, x.dtype)
        return y
    linear.leaf_axes = leaf_axes
    return linear

"""FSDP and sequence parallelism (shard.py, gptj.gather_weights): the same numbers as one device, and the memory
promise kept (no device gathers a whole stack of layers)."""
import dataclasses
import functools
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt
import ckpt_io
import config
import gptj
import lora
import shard
import train
from conftest import TINY, assert_trees_close, assert_updates_close, plain_step

# (dp, mp, fsdp, sequence_parallel): FSDP over every dp with mp beside it, sequence parallelism over mp with and
# without data parallelism, and the two together.
SPLITS = [(8, 1, True, False), (4, 2, True, False), (2, 4, True, False), (1, 4, False, True), (4, 2, False, True),
          (2, 4, True, True), (2, 2, True, True)]


def model_config(mp):
    """Two heads and odd d_ff and vocab slices per mp device, a partial rotary, four layers; d_model divides by 8."""
    return gptj.Config(n_vocab=7 * mp, n_ctx=16, d_model=32, n_head=2 * mp, n_layer=4, rotary_dim=4, d_ff=5 * mp * 4)


def noisy_params(cfg, seed):
    """Every leaf random, LayerNorms and biases too, so that a misplaced one shows."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x + 0.1 * rng.standard_normal(x.shape), np.float32),
                        gptj.init_params(cfg, jax.random.PRNGKey(seed % 1000)))


@partial(jax.jit, static_argnums=(3,))
def plain(params, tokens, mask, cfg):
    (loss, logits), grads = jax.value_and_grad(
        lambda p: (gptj.loss_fn(p, tokens, cfg, mask, 1e-4), gptj.forward(p, tokens[:, :-1], cfg)[0]), has_aux=True)(params)
    return loss, grads, logits


@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def split(params, tokens, mask, cfg, mesh, fsdp, sp):
    def both(p):
        loss = shard.loss_fn(p, tokens, cfg, mesh, mask, 1e-4, fsdp=fsdp, sequence_parallel=sp)
        return loss, shard.forward(p, tokens[:, :-1], cfg, mesh, fsdp=fsdp, sequence_parallel=sp)[0]
    (loss, logits), grads = jax.value_and_grad(both, has_aux=True)(params)
    return loss, grads, logits


@pytest.mark.parametrize("dp, mp, fsdp, sp", SPLITS)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), keep=st.floats(0.0, 1.0), ids=st.sampled_from(["random", "ends"]))
def test_split_loss_gradients_and_logits_equal_one_device(dp, mp, fsdp, sp, seed, keep, ids):
    """Loss, logits and every gradient leaf (each to its own scale) as on one device. fp32: the splits sum the same
    products in other orders, a few ulps apart; a lost or doubled shard is off by all of it. The gradients leave
    split as the params came, so that the optimizer's update is local."""
    cfg, mesh = model_config(mp), shard.make_mesh(dp, mp)
    rng = np.random.default_rng(seed)
    shape = (2 * dp, 8 + 1)  # 8 positions: sequence parallel splits them over mp
    tokens = rng.integers(0, cfg.n_vocab, shape) if ids == "random" else rng.choice([0, cfg.n_vocab - 1], shape)
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(rng.random((shape[0], 8)) < keep, jnp.float32).at[0, 0].set(1.0)
    params = noisy_params(cfg, seed)
    specs = shard.param_specs(params, fsdp=fsdp)
    want = plain(params, tokens, mask, cfg)
    got = split(shard.place(params, mesh, specs), tokens, mask, cfg, mesh, fsdp, sp)
    assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
    assert_trees_close(got[2], want[2], rtol=1e-5)
    assert_trees_close(got[1], want[1], rtol=2e-5)
    for g, spec in zip(jax.tree.leaves(got[1]), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, spec), g.ndim), (g.sharding, spec)


def test_fsdp_splits_every_weight_over_dp_and_sequence_parallel_needs_whole_chunks():
    specs = shard.param_specs(fsdp=True)
    assert specs["h"]["q_proj"]["weight"] == P(None, shard.DP, shard.MP)
    assert specs["h"]["out_proj"]["weight"] == P(None, shard.MP, shard.DP)
    assert specs["wte"] == P(shard.MP, shard.DP)
    assert specs["h"]["fc_in"]["bias"] == P(None, shard.MP)  # no embed axis: whole
    cfg = model_config(2)
    params = gptj.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sequence_parallel splits seq=7 over mp=2.*multiple of 2"):
        shard.loss_fn(params, jnp.zeros((2, 8), jnp.int32), cfg, shard.make_mesh(1, 2), sequence_parallel=True)
    with pytest.raises(ValueError, match="fsdp splits d_model=32 over dp=3"):
        shard.loss_fn(params, jnp.zeros((3, 9), jnp.int32), cfg, shard.make_mesh(3, 2), fsdp=True)
    with pytest.raises(ValueError, match="sequence_parallel is for training"):
        shard.forward(params, jnp.zeros((2, 8), jnp.int32), cfg, shard.make_mesh(1, 2),
                      cache=gptj.init_cache(cfg, 2, 8), sequence_parallel=True)


def test_lora_adapters_over_an_fsdp_base():
    """LoRA over a base split by FSDP: the base's weights gathered a layer at a time, the adapters (gptj.PARAMS does
    not declare them) whole on every dp device; the loss and the adapters' gradients as on one device."""
    cfg = model_config(2)
    base = noisy_params(cfg, 0)
    rng = np.random.default_rng(1)  # random B too: a constant B's gradient for fc_out's A cancels to rounding noise
    adapters = jax.tree.map(lambda x: np.asarray(x + 0.1 * rng.standard_normal(x.shape), np.float32),
                            lora.init_adapters(cfg, 4, ("q_proj", "fc_out"), jax.random.PRNGKey(1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.n_vocab, (8, 9)), jnp.int32)
    linear, mesh = lora.linear_fn(2.0), shard.make_mesh(4, 2)
    want = jax.value_and_grad(lambda a: gptj.loss_fn(lora.combine(base, a), tokens, cfg, linear=linear))(adapters)
    specs = shard.param_specs(adapters, lora.leaf_axes, fsdp=True)
    assert shard.DP not in specs["h"]["q_proj"]["lora_a"]
    got = jax.jit(jax.value_and_grad(lambda a, b: shard.loss_fn(lora.combine(b, a), tokens, cfg, mesh, linear=linear,
                                                                fsdp=True, sequence_parallel=True)))(
        shard.place(adapters, mesh, specs), shard.place(base, mesh, shard.param_specs(base, fsdp=True)))
    assert abs(float(got[0]) - float(want[0])) <= 1e-6 * float(want[0])
    assert_trees_close(got[1], want[1], rtol=2e-5)


def gathers(hlo: str) -> list:
    """(shape, computation) of every all-gather in an HLO module's text."""
    found, computation = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        computation = head.group(1) if head else computation
        op = re.search(r"= (\S+) all-gather(?:-start)?\(", line)
        if op:
            found.append((op.group(1), computation))
    return found


def elements(shape: str) -> int:
    """'bf16[32,16]{1,0}' -> 512; a tuple's largest member."""
    dims = re.findall(r"\[([\d,]*)\]", shape)
    return max(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims)


# ---------------------------------------------------------------- the training step
# warmup 0 and two accumulated micro-batches: both steps update at a non-zero lr, each micro-batch's gradient
# reduce-scattered into the dp-split accumulator.
BASE = config.Run(**{**config.KEYS, **TINY, "n_vocab": 64, "layers": 4, "gradient_accumulation_steps": 2,
                     "d_ff": 32, "warmup_steps": 0, "weight_decay": 0.1, "fsdp": True})


@functools.cache
def programs(dp, mp, sp, dtype="float32"):
    """The FSDP Trainer on a (dp, mp) mesh, compiled once for every example, and the plain step it must equal."""
    run = dataclasses.replace(BASE, cores_per_replica=mp, per_replica_batch=8 // dp, sequence_parallel=sp,
                              dtype=dtype)
    t = train.Trainer(run, jax.devices()[: dp * mp])
    return run, t, plain_step(dataclasses.replace(BASE, fsdp=False, dtype=dtype)), jax.jit(t.init_state)


def two_steps(dp, mp, sp, seed, dtype="float32"):
    """Two sharded steps from a random state, each beside the plain step from the state the sharded one started
    at -> [(start, sharded state, sharded metrics, plain state, plain metrics)]."""
    run, t, step, init = programs(dp, mp, sp, dtype)
    assert shard.DP in t.shardings["params"]["h"]["q_proj"]["weight"].spec  # fp32 masters split over dp
    assert shard.DP in t.shardings["opt_state"][1].mu["h"]["fc_in"]["weight"].spec
    rng = np.random.default_rng(seed)
    state, out = jax.device_put(init(jax.random.PRNGKey(seed)), t.shardings), []
    for _ in range(2):
        batch = rng.integers(0, 64, (2, 8, run.seq + 1)).astype(np.int32)
        start = jax.device_get(state)  # the sharded step donates its state
        want_state, want = step(start, batch)
        state, got = t.step(state, jax.device_put(batch, t.batch_sharding), {}, t.halt(0))
        assert float(want["lr"]) > 0
        out.append((start, jax.device_get(state), got, want_state, want))  # a copy: the next step donates it
    return out


@pytest.mark.parametrize("dp, mp, sp", [(8, 1, False), (4, 2, False), (2, 4, False), (1, 4, False), (4, 2, True),
                                        (2, 4, True)])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**32 - 1))
def test_fsdp_step_equals_plain_step(dp, mp, sp, seed):
    """Two FSDP steps (sequence parallel too where sp) equal plain single-device steps, in fp32, with the
    tolerances of the ZeRO-1 property (test_train.py): loss and gradient norm to 1e-5, Adam's moments to 2e-5 of
    each leaf's scale, the params by their update."""
    for start, state, got, want_state, want in two_steps(dp, mp, sp, seed):
        assert all(math.isclose(float(got[k]), float(want[k]), rel_tol=1e-5) for k in want)
        assert_trees_close(state["opt_state"], want_state["opt_state"], rtol=2e-5)
        assert_updates_close(start, state, want_state, float(want["lr"]))


@pytest.mark.parametrize("dp, mp, sp", [(4, 2, True), (8, 1, False)])
@settings(max_examples=4)
@given(seed=st.integers(0, 2**32 - 1))
def test_bf16_fsdp_step_equals_plain_step(dp, mp, sp, seed):
    """bf16 compute over fp32 masters, the weights gathered in bf16 and the gradients reduce-scattered in fp32:
    the bf16 ZeRO-1 property's tolerances (test_train.py), in units of bf16's EPS."""
    eps = 2.0**-8
    for start, state, got, want_state, want in two_steps(dp, mp, sp, seed, "bfloat16"):
        assert math.isclose(float(got["loss"]), float(want["loss"]), rel_tol=eps)
        assert math.isclose(float(got["grad_norm"]), float(want["grad_norm"]), rel_tol=eps)
        assert_trees_close(state["opt_state"][1].mu, want_state["opt_state"][1].mu, rtol=16 * eps)
        assert_trees_close(state["opt_state"][1].nu, want_state["opt_state"][1].nu, rtol=32 * eps)
        assert_updates_close(start, state, want_state, float(want["lr"]), clear=0.1, tol=0.1)


def test_the_fsdp_step_never_gathers_a_stack_of_layers():
    """The compiled FSDP step gathers each layer's weights inside the layer loop, in the forward pass and again in
    the backward: no all-gather's result is larger than one weight of one layer (or the embedding's mp slice), so
    no device ever holds the whole model. Gathering before the loop, or remat keeping the gathered weights (a
    stack of them), fails this."""
    run, t, _, _ = programs(4, 2, False)
    found = gathers(t.lower().compile().as_text())
    one_layer = {name: shape[1:] if name.startswith("h.") else shape
                 for name, shape in gptj.param_shapes(t.cfg).items()}
    mp_slice = lambda name, shape: np.prod(shape) // (2 if set(gptj.PARAMS[name][0]) & set(shard.MP_AXES) else 1)
    bound = max(mp_slice(name, shape) for name, shape in one_layer.items())
    stack = min(mp_slice(name, shape) * t.cfg.n_layer for name, shape in one_layer.items()
                if name.startswith("h.") and len(shape) == 2)
    assert bound < stack  # the model makes the difference visible
    assert found and all(elements(shape) <= bound for shape, _ in found), found
    in_loops = [c for _, c in found if not c.startswith("main")]
    assert len(in_loops) >= 2 * 6, found  # q, k, v, out_proj, fc_in, fc_out, forward and backward


# ---------------------------------------------------------------- checkpoints stay mesh-independent
def run_in(folder, corpus, steps, **kw):
    values = {**config.KEYS, **TINY, "model_dir": str(folder), "train_set": str(corpus / "train.tokens"),
              "val_set": str(corpus / "val.tokens"), "total_steps": steps, "ckpt_every": 2, "val_every": 0, **kw}
    return config.Run(**values)


def weights(folder):
    return {k: np.asarray(v, np.float64) for k, v in ckpt_io.flat(ckpt.load(ckpt.latest(folder))).items()}


FSDP_MESH = dict(fsdp=True, sequence_parallel=True, cores_per_replica=2, per_replica_batch=1)  # dp 4 x mp 2
ONE_DEVICE = dict(per_replica_batch=4)  # the same 4 rows a step


@pytest.mark.parametrize("first, then", [(FSDP_MESH, ONE_DEVICE), (ONE_DEVICE, FSDP_MESH)])
def test_a_checkpoint_resumes_across_fsdp_and_meshes(tmp_path, corpus, first, then):
    """Two steps saved with FSDP and sequence parallelism on dp 4 x mp 2 go on for two more on one device
    without them, and the other way round, as the uninterrupted run on one device: the checkpoint holds whole
    tensors, whatever split wrote them. (Equal to rounding: the splits sum in other orders; each leaf to 1e-5 of
    its norm, where a step lost or a leaf misplaced is off by far more.)"""
    devices = lambda kw: jax.devices()[:8] if kw.get("fsdp") else jax.devices()[:1]
    train.train(run_in(tmp_path / "cut", corpus, 2, **first), devices(first))
    last = train.train(run_in(tmp_path / "cut", corpus, 4, **then), devices(then))
    assert last["step"] == 4 and ckpt.read_meta(ckpt.latest(tmp_path / "cut"))["run"]["fsdp"] == then.get("fsdp", False)
    train.train(run_in(tmp_path / "whole", corpus, 4, **ONE_DEVICE), devices(ONE_DEVICE))
    got, want = weights(tmp_path / "cut"), weights(tmp_path / "whole")
    assert got.keys() == want.keys()
    for k in want:
        assert np.linalg.norm(got[k] - want[k]) <= 1e-5 * np.linalg.norm(want[k]), k

"""Train GPT-J: small models anywhere, GPT-J-6B fine-tuning on a TPU v3-8. Resumable to the bit.

    python train.py                                   # small GPT-J on the bundled Shakespeare
    python train.py --config configs/6B_v3-8.json --init_from PATH --train_set 'data/*.jsonl'
    python train.py --config configs/6B_v3-8.json --plan      # per-device memory, without the devices
    python train.py --benchmark                       # tokens/s and MFU on random tokens
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import secrets
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt
import ckpt_peft
import data
import decode
import gptj
import lora
import runtime
import shard

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shakespeare.json")

# Every key, its default and so its type. The first group are the original mesh-transformer-jax keys.
KEYS = dict(
    layers=4, d_model=128, n_heads=4, n_vocab=50304, norm="layernorm", pe="rotary", pe_rotary_dims=32,
    seq=128, cores_per_replica=1, per_replica_batch=8, gradient_accumulation_steps=1,
    warmup_steps=20, anneal_steps=540, lr=3e-3, end_lr=3e-4, weight_decay=0.1, total_steps=560,
    val_every=100, val_batches=10, ckpt_every=100, keep_every=0, tpu_size=0,
    model_dir="runs/shakespeare", train_set="shakespeare:train", val_set="shakespeare:val", name="shakespeare",
    wandb_project="",
    # New keys (see docs/training.md):
    n_ctx=0, d_ff=0, dtype="auto", remat=False, z_loss=1e-4, seed=0, log_every=10, keep_last=3,
    init_from="", sample_tokens=100, grad_acc_dtype="float32",
    lora_rank=0, lora_alpha=16.0, lora_targets="q_proj,v_proj", lora_from="",
)
# Original keys that only made sense on Google Cloud; accepted and reported as ignored.
IGNORED = {"bucket", "eval_harness_tasks", "comment", "tokens_per_step"}
# Ranges and choices that the types alone do not enforce.
AT_LEAST_1 = ("layers", "d_model", "n_heads", "n_vocab", "seq", "cores_per_replica", "per_replica_batch",
              "gradient_accumulation_steps", "log_every", "keep_last")
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "grad_acc_dtype": ("float32", "bfloat16")}


class ConfigError(ValueError):
    pass


def _model(self, platform: str | None = None) -> gptj.Config:
    """The gptj.Config this run trains on `platform` (default: JAX's default backend's)."""
    if self.norm != "layernorm" or self.pe != "rotary":
        raise ConfigError(f"norm={self.norm!r}, pe={self.pe!r}: GPT-J uses norm 'layernorm' and pe 'rotary'")
    dtype = self.dtype
    if dtype == "auto":  # bf16 compute where the matrix units want it, fp32 on CPUs
        dtype = "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    n_ctx = self.n_ctx or self.seq
    if self.seq > n_ctx:
        raise ConfigError(f"seq={self.seq} is above the model's context n_ctx={n_ctx}: lower seq")
    try:
        return gptj.Config(n_vocab=self.n_vocab, n_ctx=n_ctx, d_model=self.d_model, n_layer=self.layers,
                           n_head=self.n_heads, rotary_dim=self.pe_rotary_dims, d_ff=self.d_ff, dtype=dtype,
                           remat=self.remat)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# The merged training configuration, KEYS as attributes.
Run = dataclasses.make_dataclass("Run", [(k, object, v) for k, v in KEYS.items()], frozen=True,
                                 namespace={"model": _model})


def _typed(key, value, where):
    want = KEYS[key]
    if key == "val_set" and isinstance(value, dict):
        if not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: val_set {value!r} must map names to data specs (strings)")
        return value
    if isinstance(want, bool):
        ok = isinstance(value, bool)
    elif isinstance(want, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(want)) and not (isinstance(value, bool) and not isinstance(want, bool))
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {type(want).__name__}, got {value!r}")
    return value


def _parse_flag(key, text):
    """A command-line value, parsed as the key's type."""
    want = KEYS[key]
    try:
        if isinstance(want, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return type(want)(text)
    except ValueError:
        raise ConfigError(f"--{key} {text!r}: expected {type(want).__name__}") from None


def load_config(path=None, overrides=()) -> Run:
    """Defaults <- the JSON file <- command-line `--key value` pairs. Unknown keys are an error; defaults that
    clash with what the user set are fitted to it (fit_defaults)."""
    path = path or DEFAULT_CONFIG
    raw = ckpt.read_json(path)
    unknown = sorted(set(raw) - set(KEYS) - IGNORED)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(unknown)}; see docs/training.md for the keys")
    ignored = sorted(set(raw) & IGNORED)
    if ignored:
        print(f"config {path}: ignoring {', '.join(ignored)} (Google Cloud specifics)", file=sys.stderr)
    values = {k: _typed(k, v, f"config {path}") for k, v in raw.items() if k in KEYS}
    values.update(overrides)
    run = Run(**{**KEYS, **values})
    for key, value in dataclasses.asdict(run).items():
        low = 1 if key in AT_LEAST_1 else 0  # every number is a size, count, rate or seed
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"{key}={value}: must be at least {low}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(CHOICES[key])}")
    # What the user set: flags, and the keys of a config file they named (the default file is defaults too).
    explicit = set(overrides) | (set(values) if path != DEFAULT_CONFIG else set())
    return fit_defaults(sizes_from_weights(run, explicit), explicit)


# The model's sizes: Run keys and the gptj.Config fields they set.
SIZES = {"layers": "n_layer", "d_model": "d_model", "n_heads": "n_head", "n_vocab": "n_vocab",
         "pe_rotary_dims": "rotary_dim", "d_ff": "d_ff", "n_ctx": "n_ctx"}


def sizes_from_weights(run: Run, explicit: set) -> Run:
    """Fine-tuning (init_from) takes the model's sizes from its weights, n_ctx included: training at a seq below
    the base's context must not shrink the model's. A size the user set that contradicts the weights is an error."""
    if not run.init_from or not os.path.isdir(run.init_from):
        return run  # a missing base is restore's error to report; --plan plans the sizes the config gives
    try:
        base = ckpt.read_config(run.init_from)
    except ValueError as e:
        raise ConfigError(f"init_from: {e}") from None
    sizes = {key: getattr(base, field) for key, field in SIZES.items()}
    # d_ff and n_ctx 0 mean "derive it", which never contradicts.
    clash = [f"{k} {getattr(run, k)} (the weights': {v})" for k, v in sizes.items()
             if k in explicit and getattr(run, k) not in (v, 0 if k in ("d_ff", "n_ctx") else v)]
    if clash:
        raise ConfigError(f"init_from {run.init_from} does not match {', '.join(clash)}: a fine-tuned model's sizes "
                          f"are its base's; drop those settings, or set them to the weights'")
    return dataclasses.replace(run, **sizes)


def fit_defaults(run: Run, explicit: set) -> Run:
    """Defaults give way to what the user set: a default never makes a valid run fail. Only a value the user
    set can clash with another into an error."""
    fit, notes = {}, []
    n_ctx = run.n_ctx or run.seq
    if "seq" not in explicit and run.n_ctx and run.seq > run.n_ctx:
        fit["seq"] = n_ctx = run.n_ctx
    d_head = run.d_model // run.n_heads
    if "pe_rotary_dims" not in explicit and run.pe_rotary_dims > d_head:
        fit["pe_rotary_dims"] = d_head - d_head % 2  # rotary pairs need an even count
    if "sample_tokens" not in explicit and run.sample_tokens:
        if run.n_vocab <= data.EOT:
            fit["sample_tokens"] = 0
            notes.append(f"no final sample: n_vocab={run.n_vocab} is not GPT-2's vocabulary")
        elif run.sample_tokens + 1 > n_ctx:  # the sample's prompt is one <|endoftext|>
            fit["sample_tokens"] = n_ctx - 1
    notes += [f"{k} {getattr(run, k)} -> {v} to fit the other settings" for k, v in fit.items()
              if not (k == "sample_tokens" and v == 0)]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return dataclasses.replace(run, **fit)


# ---------------------------------------------------------------- optimisation
def schedule(run: Run):
    """mesh-transformer-jax's GPT-3 schedule: linear warmup, cosine to end_lr over anneal_steps, then constant."""
    def lr(step):
        warm = jnp.clip(step / run.warmup_steps, 0.0, 1.0) if run.warmup_steps else 1.0
        anneal = jnp.clip((step - run.warmup_steps) / max(run.anneal_steps, 1), 0.0, 1.0)
        return warm * run.lr - (run.lr - run.end_lr) * (1 - jnp.cos(jnp.pi * anneal)) / 2
    return lr


def decay_mask(params):
    """Weight decay on matrices only: not on biases or LayerNorm parameters (the stacked layer axis excluded)."""
    return {k: jax.tree.map(lambda x: x.ndim >= (3 if k == "h" else 2), v) for k, v in params.items()}


def optimizer(run: Run):
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(0.9, 0.999, 1e-8),
        optax.add_decayed_weights(run.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule(run)),
    )


def state_specs(state_shapes, mesh):
    """Params split as shard.param_specs; optimizer state also split over dp (ZeRO-1)."""
    pspecs = shard.param_specs(state_shapes["params"], lora.leaf_axes)
    dp = mesh.shape[shard.DP]
    # Adam's mu and nu mirror the params: each leaf takes the spec of the param whose key path ends its own.
    by_path = {jax.tree_util.keystr(p): s for p, s in
               jax.tree_util.tree_leaves_with_path(pspecs, is_leaf=lambda x: isinstance(x, P))}

    def opt_spec(path, leaf):
        key = jax.tree_util.keystr(path)
        base = next((s for k, s in by_path.items() if key.endswith(k)), P())
        return shard.zero_spec(base, leaf.shape, dp) if leaf.ndim else P()

    ospecs = jax.tree_util.tree_map_with_path(opt_spec, state_shapes["opt_state"])
    return {"params": pspecs, "opt_state": ospecs}


def linear_layer(run: Run):
    """The model's projections: plain, or with LoRA adapters beside the frozen weights."""
    return lora.linear_fn(run.lora_alpha / run.lora_rank) if run.lora_rank else gptj.dense


def make_step(run: Run, cfg: gptj.Config, mesh):
    """The compiled training step: gradient accumulation over micro-batches inside one program.

    step(state, batch, frozen=None, halt=None): state["params"] are what trains, frozen (LoRA's base weights) what
    does not: the model runs on both, and only the trained params get gradients and optimizer state. halt: every
    dp row's flags (see Trainer.halt), returned as their maximum, so that all processes learn them at once."""
    opt = optimizer(run)
    acc_dtype = jnp.dtype(run.grad_acc_dtype)
    linear = linear_layer(run)

    def loss(params, tokens, frozen):
        params = lora.combine(frozen, params)
        if mesh is None or mesh.size == 1:  # shard_map's backward would copy every gradient through a psum
            return gptj.loss_fn(params, tokens, cfg, z_loss=run.z_loss, linear=linear)
        return shard.loss_fn(params, tokens, cfg, mesh, z_loss=run.z_loss, linear=linear)

    def step(state, batch, frozen=None, halt=None):  # batch [grad_acc, batch, seq + 1]
        params, frozen = state["params"], {} if frozen is None else frozen

        def micro(acc, tokens):
            value, grads = jax.value_and_grad(loss)(params, tokens, frozen)
            return jax.tree.map(lambda a, g: a + g.astype(acc_dtype), acc, grads), value

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), params)
        grads, losses = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g, p: (g / batch.shape[0]).astype(p.dtype), grads, params)
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        count = state["opt_state"][-1].count  # the schedule's own step counter: the lr this step used
        metrics = {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads), "lr": schedule(run)(count)}
        return new, metrics | ({} if halt is None else {"halt": halt.max()})

    return opt, step


def flops_per_token(cfg: gptj.Config, seq: int, adapters: int = 0) -> float:
    """Training FLOPs per token: 6 per parameter plus attention. wte is left out: an embedding lookup multiplies
    nothing. (Counting it, the "6 x all parameters" often quoted, would credit a small model with a 50k vocab
    with half again the FLOPs it does.) With LoRA (`adapters` parameters), the frozen weights need no weight
    gradient: 4 FLOPs per base parameter (forward, and the activations' gradient), 6 per adapter parameter."""
    return ((4 if adapters else 6) * (cfg.n_params() - cfg.n_vocab * cfg.d_model) + 6 * adapters
            + 12 * cfg.n_layer * cfg.d_model * seq)


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
    best = math.inf
    for _ in range(readings):  # the first may compile: the fastest counts
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * n**3 / best


@functools.cache
def device_peak(device, dtype) -> float:
    """matmul_peak, read once per process and device: the runs of one process (tests start dozens) share it."""
    return matmul_peak(device, dtype)


# ---------------------------------------------------------------- the run
class Trainer:
    """What a run keeps fixed: mesh, compiled programs, shardings, and which rows of a batch this process builds.
    The state itself stays explicit. devices: those to train on (default all, of every process); hosts:
    {process index: host}, which keeps each model replica inside one host (runtime.hosts())."""

    def __init__(self, run: Run, devices=None, hosts=None):
        self.mesh = shard.mesh_for(run.cores_per_replica, devices, hosts)
        mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        self.device = (mine or list(self.mesh.devices.flat))[0]  # for what depends only on the platform
        self.run, self.cfg = run, run.model(self.device.platform)
        self.dp = self.mesh.shape[shard.DP]
        self.batch = run.per_replica_batch * self.dp
        shard.check(self.cfg, self.mesh, self.batch)
        self.lora = run.lora_rank > 0  # LoRA: adapters train; the base weights are frozen, in the compute dtype
        if run.lora_from and not self.lora:
            raise ConfigError(f"lora_from={run.lora_from!r} needs lora_rank > 0 (the adapter's r)")
        if self.lora:
            try:
                self.targets = lora.check(self.cfg, run.lora_rank, run.lora_targets.split(","))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.opt, step = make_step(run, self.cfg, self.mesh)
        shapes = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
        self.shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), state_specs(shapes, self.mesh),
                                      is_leaf=lambda x: isinstance(x, P))
        self.shapes = self._placed(shapes, self.shardings)
        frozen = jax.eval_shape(self.random_frozen, jax.random.PRNGKey(0)) if self.lora else {}
        self.frozen_shardings = shard.named(self.mesh, shard.param_specs(frozen)) if self.lora else {}
        self.frozen_shapes = self._placed(frozen, self.frozen_shardings)
        self.batch_shape = (run.gradient_accumulation_steps, self.batch, run.seq + 1)
        self.batch_sharding = NamedSharding(self.mesh, P(None, shard.DP, None))
        self.rows = shard.local_rows(self.batch_sharding, self.batch_shape, 1)  # what this process builds
        self.halt_sharding = NamedSharding(self.mesh, P(shard.DP))
        self.halt_rows = shard.local_rows(self.halt_sharding, (self.dp,), 0)
        replicated = NamedSharding(self.mesh, P())
        # step(state, batch, frozen, halt) -> (state, metrics); frozen is {} unless LoRA
        self.step = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding, self.frozen_shardings,
                                                self.halt_sharding),
                            out_shardings=(self.shardings, replicated), donate_argnums=0,
                            compiler_options=runtime.compiler_options(self.device))
        rows, linear = NamedSharding(self.mesh, P(shard.DP, None)), linear_layer(run)
        self.evaluate = jax.jit(
            lambda p, b, mask, f: shard.loss_fn(lora.combine(f, p), b, self.cfg, self.mesh, mask, linear=linear),
            in_shardings=(self.shardings["params"], rows, rows, self.frozen_shardings), out_shardings=replicated)
        self.eval_sharding = rows

    @staticmethod
    def _placed(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def lower(self):
        """The step lowered for abstract inputs: what --plan compiles, with nothing allocated."""
        batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        halt = jax.ShapeDtypeStruct((self.dp,), jnp.int32, sharding=self.halt_sharding)
        return self.step.lower(self.shapes, batch, self.frozen_shapes, halt)

    def init_state(self, key, params=None):
        if params is None:
            params = (lora.init_adapters(self.cfg, self.run.lora_rank, self.targets, key) if self.lora
                      else gptj.init_params(self.cfg, key))
        return {"params": params, "opt_state": self.opt.init(params)}

    def fresh_state(self, params=None):
        init = jax.jit(self.init_state, out_shardings=self.shardings)
        return init(jax.random.PRNGKey(self.run.seed), params)

    def random_frozen(self, key):
        """A random base in the compute dtype, for --benchmark (and its shapes for --plan)."""
        return jax.tree.map(lambda x: x.astype(self.cfg.dtype), gptj.init_params(self.cfg, key))

    def tokens_per_step(self):
        return self.batch * self.run.gradient_accumulation_steps * self.run.seq

    def flops_per_token(self):
        adapters = sum(x.size for x in jax.tree.leaves(self.shapes["params"])) if self.lora else 0
        return flops_per_token(self.cfg, self.run.seq, adapters)

    # Each process builds only the rows its devices hold; together they are the global batch.
    def local_batch(self, stream: data.Stream, position: int) -> np.ndarray:
        """This process's rows of the batch at `position`: int32 [grad_acc, rows, seq + 1]. The global batch is
        stream positions position..position + grad_acc * batch - 1, micro-batch by micro-batch."""
        acc, batch, width = self.batch_shape
        seqs = position + np.arange(acc)[:, None] * batch + np.arange(self.rows.start, self.rows.stop)
        return stream.rows(seqs.reshape(-1)).reshape(acc, -1, width)

    def global_batch(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.batch_sharding, local, self.batch_shape)

    def halt(self, flags: int) -> jax.Array:
        """A step's input flags (STOP, ERROR) from this process; the step returns their maximum over all."""
        local = np.full(self.halt_rows.stop - self.halt_rows.start, flags, np.int32)
        return jax.make_array_from_process_local_data(self.halt_sharding, local, (self.dp,))

    def validate(self, params, frozen, val_sets: dict, batches: int) -> dict:
        """Mean loss over the first `batches` batches of consecutive windows of each validation set: "val_loss" for
        the first, val_loss_<name> for more (the original's configs name several). A set smaller than one batch is
        one short batch, padded with rows that the mask leaves out."""
        out = {}
        for i, (name, toks) in enumerate(val_sets.items()):
            losses = []
            for index in data.eval_windows(toks, self.batch, self.run.seq)[:batches]:
                mine = index[self.rows]
                tokens = data.window_rows(toks, np.maximum(mine, 0), self.run.seq)
                mask = np.repeat((mine >= 0).astype(np.float32)[:, None], self.run.seq, 1)
                tokens, mask = (jax.make_array_from_process_local_data(self.eval_sharding, x, (self.batch,) + x.shape[1:])
                                for x in (tokens, mask))
                losses.append(float(self.evaluate(params, tokens, mask, frozen)))
            if losses:  # val_batches 0: no validation, as in the original's example config
                out["val_loss" if i == 0 else f"val_loss_{name}"] = float(np.mean(losses))
        return out


# Each core's HBM, for the plan's verdict; the TPU compiler itself refuses a step that does not fit its core.
HBM_BYTES = {"TPU v2": 8 * 2**30, "TPU v3": 16 * 2**30, "TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30,
             "TPU v5": 95 * 2**30, "TPU v6 lite": 32 * 2**30}


def _bytes(text: str) -> int:
    """'15.48G' (an XLA memory figure) -> bytes."""
    return round(float(text[:-1]) * 1024 ** " KMGT".index(text[-1]))


def plan(run: Run, devices=None, topology: str | None = None, device_bytes: int | None = None) -> dict:
    """Compile the real step for the config's mesh on abstract shapes; per-device memory without allocating, and
    whether it fits `device_bytes` a device (default: the HBM of the TPU planned for, or of tpu_size's v3 cores).
    A step that the TPU compiler finds too big is an answer too: "fits" false, with the bytes it needed."""
    t = Trainer(run, devices)

    def per_device(tree):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    params, opt, frozen = (per_device(t.shapes["params"]), per_device(t.shapes["opt_state"]),
                           per_device(t.frozen_shapes))
    kind = t.device.device_kind
    if device_bytes is None:
        device_bytes = HBM_BYTES.get(kind if t.device.platform == "tpu" else "TPU v3" if run.tpu_size > 1 else "")
    out = {"devices": t.mesh.size, "platform": t.device.platform, "device_kind": kind, "topology": topology,
           "dtype": t.cfg.dtype, "remat": t.cfg.remat, "mesh": {"dp": t.dp, "mp": t.mesh.shape[shard.MP]},
           "n_params": t.cfg.n_params(), "params_bytes": params, "opt_state_bytes": opt, "frozen_bytes": frozen,
           "flops_per_step": t.flops_per_token() * t.tokens_per_step()}
    try:
        temp = int(t.lower().compile().memory_analysis().temp_size_in_bytes)
    except jax.errors.JaxRuntimeError as e:
        message = str(e).splitlines()[0]
        figures = re.findall(r"\(([\d.]+[KMGT])\)", message)  # "...temporaries (19.91G) exceeds available HBM (15.48G)"
        if "RESOURCE_EXHAUSTED" not in message or len(figures) < 2:
            raise
        return out | {"fits": False, "needed_bytes": _bytes(figures[0]), "available_bytes": _bytes(figures[-1]),
                      "compiler": message}
    total = params + opt + frozen + temp
    return out | {"fits": None if device_bytes is None else total <= device_bytes, "temp_bytes": temp,
                  "total_bytes": total, "available_bytes": device_bytes}


def v3_topology(tpu_size: int) -> str:
    """The original's tpu_size, a TPU v3-N (N cores, two a chip), as a topology name: v3-8 -> v3:2x2,
    v3-256 -> v3:8x16."""
    chips = tpu_size // 2
    if tpu_size < 2 or chips & (chips - 1):
        raise ConfigError(f"tpu_size={tpu_size}: a TPU v3 slice has 2^k cores (8, 32, 256...); --topology names others")
    a = 2 ** (chips.bit_length() // 2)  # the shorter side
    return f"v3:{min(a, chips // a)}x{max(a, chips // a)}"


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def plan_devices(run: Run, topology=None) -> tuple[list, str | None]:
    """The devices --plan compiles for without owning them, and their topology: a TPU topology's (its compiler's
    own memory analysis; libtpu works on a machine without TPUs), by default the v3-N of tpu_size where libtpu is
    installed, or else simulated CPU devices."""
    n = max(run.tpu_size or run.cores_per_replica, 1)
    if topology is None and run.tpu_size > 1 and has_libtpu():
        topology = v3_topology(run.tpu_size)
    elif topology:
        n = 0  # a topology named: all of its devices
    if topology:
        try:
            from jax.experimental import topologies
            dims = [int(d) for d in topology.split(":")[1].split("x")]
            # One host holds up to 2x2x1 chips; a smaller slice is all on one host.
            bounds = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
            devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                   chips_per_host_bounds=bounds).devices
        except (ValueError, IndexError):
            raise ConfigError(f"--topology {topology!r}: expected NAME:AxB or NAME:AxBxC, such as v5e:1x1 or v4:2x2x1")
        except Exception as e:  # no libtpu, or a topology it does not know; its errors have no common base
            raise ConfigError(f"--topology {topology}: {str(e).splitlines()[0]} (needs libtpu: pip install "
                              f"'jax[tpu]', which plans on a machine without TPUs)") from None
        if len(devices) < n:
            raise ConfigError(f"--topology {topology} has {len(devices)} devices, the config needs {n}")
        return list(devices)[:n or None], topology
    with contextlib.suppress(RuntimeError):  # raised once JAX's backends have started: then they have what they have
        jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(f"--plan needs {n} devices, and JAX started with {len(devices)}: plan in a fresh process")
    return devices[:n], None


def time_steps(step, state, batch, steps: int, warmup: int = 10):
    """Time a step function `state, metrics = step(state, batch)`: (seconds of the first call, compiling
    included; mean seconds of `steps` calls after `warmup` more). The warm-up lets a CPU's heap reach its
    high-water mark (see runtime.keep_freed_host_memory): until then a step can fault in fresh pages, which
    on this 2-core CPU made 1 in 5 runs with a 5-step warm-up a quarter slower."""
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


def benchmark(run: Run, steps: int = 5) -> dict:
    """Time `steps` training steps on random tokens. The matmul peak is measured before and after them and the
    higher kept: on a shared CPU a single reading can be a third low, which would inflate mfu."""
    t = Trainer(run, hosts=runtime.hosts())
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


# ---------------------------------------------------------------- the loop
STOP, ERROR = 1, 2  # the flags a step carries from every process: a stop signal seen, an error seen
SHAPE_FIELDS = ("n_vocab", "d_model", "n_layer", "n_head", "rotary_dim", "d_ff")


def check_same_lora(saved, now, where: str):
    """A run resumes with the LoRA settings and the base it was trained with, or not at all."""
    keys = ("rank", "alpha", "targets", "base_fingerprint")
    pick = lambda d: None if d is None else {k: sorted(d[k]) if k == "targets" else d[k] for k in keys}
    if pick(saved) != pick(now):
        held = "full fine-tuning" if saved is None else (
            f"LoRA rank {saved['rank']}, alpha {saved['alpha']} on {','.join(saved['targets'])} over {saved['base']}")
        raise ConfigError(f"{where} holds {held}: resume with those settings and that base (a base whose weights "
                          f"changed has another fingerprint), or use another model_dir")


def check_compatible(cfg: gptj.Config, other: gptj.Config, where: str, fields=SHAPE_FIELDS):
    diff = [f"{f} {getattr(other, f)} vs {getattr(cfg, f)}" for f in fields if getattr(other, f) != getattr(cfg, f)]
    if diff:
        raise ConfigError(f"{where} holds a different model ({', '.join(diff)}): "
                          f"use another model_dir/init_from, or the config that matches it")


class MetricsLog:
    """Where each metrics record goes besides the terminal: <model_dir>/metrics.jsonl, and a Weights & Biases run
    when wandb_project is set and wandb is installed (only process 0 logs). The W&B run's id is kept in
    <model_dir>/wandb_id, so that a resumed training run continues the same W&B run."""

    def __init__(self, run: Run):
        self.path, self.wandb = os.path.join(run.model_dir, "metrics.jsonl"), None
        if not run.wandb_project or jax.process_index() != 0:
            return
        try:
            import wandb
        except ImportError:
            print(f"note: wandb_project={run.wandb_project!r} but wandb is not installed (pip install wandb): "
                  "logging to metrics.jsonl only", file=sys.stderr)
            return
        id_file = os.path.join(run.model_dir, "wandb_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(6)
        try:
            self.wandb = wandb.init(project=run.wandb_project, name=run.name, id=run_id, resume="allow",
                                    config=dataclasses.asdict(run),
                                    dir=None if os.environ.get("WANDB_DIR") else run.model_dir)
        except Exception as e:  # wandb's own errors (no login, no network) have no common base class
            raise ConfigError(f"wandb could not start a run ({e}): `wandb login`, or WANDB_MODE=offline") from None
        with open(id_file, "w") as f:
            f.write(run_id + "\n")

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self, failed: bool):
        if self.wandb is not None:
            self.wandb.finish(exit_code=int(failed))


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def note(message: str):
    """Progress and notes come from process 0 alone."""
    if runtime.is_main():
        print(message, file=sys.stderr, flush=True)


def bad_ids(tokens: np.ndarray, n_vocab: int, name: str) -> ConfigError | None:
    top = int(tokens.max()) if tokens.size else 0
    if top >= n_vocab:
        return ConfigError(f"{name} holds token id {top}, not below n_vocab={n_vocab}: tokenize it with the "
                           f"model's vocabulary, or raise n_vocab")
    return None


def datasets(run: Run, cfg: gptj.Config):
    """(the training stream, {name: validation tokens}, training tokens), checked. Every host reads the same files:
    they must be on a shared or replicated folder."""
    if run.sample_tokens and (cfg.n_vocab <= data.EOT or run.sample_tokens + 1 > cfg.n_ctx):
        raise ConfigError(f"sample_tokens={run.sample_tokens}: the final sample needs GPT-2's vocabulary (n_vocab > "
                          f"{data.EOT}) and sample_tokens + 1 <= n_ctx = {cfg.n_ctx}: lower it, or 0 for no sample")
    os.makedirs(run.model_dir, exist_ok=True)
    train_tokens = data.load_tokens(run.train_set)
    specs = run.val_set if isinstance(run.val_set, dict) else ({"val": run.val_set} if run.val_set else {})
    val = {name: data.load_tokens(spec) for name, spec in specs.items()}
    for name, toks in [("train_set", train_tokens)] + list(val.items()):
        if len(toks) < run.seq + 1:
            raise ConfigError(f"{name} has {len(toks)} tokens, fewer than seq + 1 = {run.seq + 1}: more data or lower seq")
    for name, toks in val.items():  # now; the training set batch by batch, as it can be huge
        error = bad_ids(toks, cfg.n_vocab, "val_set" if len(val) == 1 else f"val_set {name}")
        if error:
            raise error
    return data.Stream(train_tokens, run.seq, run.seed), val, len(train_tokens)


@dataclasses.dataclass
class Start:
    """Where a run starts: a restored state, or params to initialise one from (None: random); the frozen base and
    what it is (LoRA); the step and data position."""
    state: dict | None
    params: dict | None
    frozen: dict
    adapted: dict | None
    step: int
    position: int


def restore(t: Trainer, run: Run) -> Start:
    """Resume from the newest complete checkpoint in model_dir, else start from init_from / lora_from or afresh.
    Each process reads just the slices its own devices hold."""
    cfg, frozen, adapted = t.cfg, {}, None
    if t.lora:  # the base loads straight into the compute dtype: it never trains, and fp32 would double it
        if not run.init_from:
            raise ConfigError("lora_rank > 0 needs init_from: the base weights that the adapters adapt")
        frozen, base_cfg = ckpt.load_weights(run.init_from, mesh=t.mesh, dtype=cfg.dtype)
        check_compatible(cfg, base_cfg, f"init_from {run.init_from}", SHAPE_FIELDS + ("n_ctx",))
        adapted = {"rank": run.lora_rank, "alpha": run.lora_alpha, "targets": list(t.targets),
                   "base": os.path.abspath(run.init_from), "base_fingerprint": ckpt.fingerprint(run.init_from)}
    latest = ckpt.latest(run.model_dir)
    if latest:
        meta = ckpt.read_meta(latest)
        check_compatible(cfg, ckpt.meta_config(meta, os.path.join(latest, "meta.json")), f"model_dir {run.model_dir}")
        check_same_lora(ckpt.lora_meta(meta, latest) if "lora" in meta else None, adapted, f"model_dir {run.model_dir}")
        state = ckpt.load(latest, like=t.shapes, mesh=t.mesh, specs=t.shardings)
        note(f"resumed from {latest} (step {meta['step']})")
        return Start(state, None, frozen, adapted, meta["step"], meta["data_position"])
    params = None
    if t.lora and run.lora_from:  # continue adapters trained elsewhere, with a fresh optimizer
        params = ckpt_peft.read_adapters(run.lora_from, cfg, run.lora_rank, run.lora_alpha, t.targets)
        params = jax.device_put(params, t.shardings["params"])
        note(f"adapters from {run.lora_from}")
    elif run.init_from and not t.lora:
        params, init_cfg = ckpt.load_weights(run.init_from, mesh=t.mesh, dtype="float32")
        check_compatible(cfg, init_cfg, f"init_from {run.init_from}", SHAPE_FIELDS + ("n_ctx",))
    if run.init_from:
        note(f"initialised from {run.init_from}")
    return Start(None, params, frozen, adapted, 0, 0)


def save(run: Run, t: Trainer, state, step: int, position: int, adapted) -> str:
    """Checkpoint step_<step> (written jointly by all processes), then prune the old ones."""
    path = os.path.join(run.model_dir, f"step_{step:08d}")
    extra = {"step": step, "data_position": position, "run": dataclasses.asdict(run)}
    ckpt.save(path, state, t.cfg, extra | ({"lora": adapted} if adapted else {}), force=True)
    if runtime.is_main():
        ckpt.prune(run.model_dir, run.keep_last, run.keep_every)
    return path


class Progress:
    """Times the steps and turns a step's metrics into a record: printed and logged by process 0. Raises on a
    non-finite loss (every process sees the same loss, so all of them stop there)."""

    def __init__(self, run: Run, t: Trainer, step: int, train_tokens: int):
        self.run, self.t, self.log = run, t, MetricsLog(run)
        self.peak = device_peak(t.device, t.cfg.dtype) * t.mesh.size
        self.peak_read = time.perf_counter()
        self.fpt = t.flops_per_token()
        self.tick, self.tick_step = time.perf_counter(), step
        note(f"{run.name}: {t.cfg.n_params() / 1e6:.1f}M params, mesh dp={t.dp} mp={t.mesh.shape[shard.MP]}, "
             f"{jax.process_count()} process(es), {t.tokens_per_step()} tokens/step, {train_tokens} training tokens")

    def __call__(self, step: int, metrics: dict, validate) -> dict:
        m = {k: float(v) for k, v in metrics.items() if k != "halt"}
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"loss is {m['loss']} at step {step}: lower lr or check the data; "
                                     f"the last good checkpoint is {ckpt.latest(self.run.model_dir)}")
        now = time.perf_counter()
        tps = (step - self.tick_step) * self.t.tokens_per_step() / (now - self.tick)
        if self.t.device.platform == "cpu" and now - self.peak_read > 60:
            # Read again each minute and the highest kept: on a shared CPU one reading can be a third low, which
            # would inflate mfu. A few matmuls, outside the timed steps.
            self.peak = max(self.peak, matmul_peak(self.t.device, self.t.cfg.dtype, readings=1) * self.t.mesh.size)
            self.peak_read = time.perf_counter()
        record = {"step": step, **m, "tokens_per_s": tps, "mfu": tps * self.fpt / self.peak, **validate()}
        eta = (self.run.total_steps - step) * (now - self.tick) / (step - self.tick_step)
        if runtime.is_main():
            print(f"step {step}/{self.run.total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | {tps:,.0f} tok/s | "
                  f"mfu {record['mfu']:.2f} | eta {fmt_time(eta)}"
                  + "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_loss")), flush=True)
            self.log.write(record)
        self.tick, self.tick_step = time.perf_counter(), step
        return record

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.log.close(failed=kind is not None)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a preemption) and SIGINT (Ctrl-C) ask the run to stop: the list yielded gets the signal, the next
    step carries it to every process, and all of them save that step and return. A second signal is not caught:
    it stops the process at once. The handlers found are restored on the way out."""
    seen = []

    def on_signal(signum, frame):
        seen.append(signum)
        signal.signal(signum, previous[signum] or signal.SIG_DFL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)  # None: a handler not set from Python


def final_sample(run: Run, t: Trainer, params, frozen):
    enc = data.tokenizer()
    row = decode.Row(decode.prompt_ids(enc, ""), run.sample_tokens, temperature=0.8, top_p=0.9, key=(run.seed, 0))
    # Through the adapters as trained: merging would hold a second base, and bf16 would round the update.
    ids = decode.complete(lora.combine(frozen, params), t.cfg, [row], mesh=t.mesh, linear=linear_layer(run))[0]
    if runtime.is_main():
        print(f"sample:\n{enc.decode(ids)}", flush=True)


def train(run: Run, devices=None) -> dict:
    """The training loop: resume or initialise, then step, log, validate, checkpoint; returns the last record.
    Every process of a multi-host run calls it alike; devices: a subset of this process's, for tests."""
    hosts = runtime.hosts() if devices is None else None
    with runtime.agreed():  # what one host alone can get wrong ends every process here, with its message
        t = Trainer(run, devices, hosts)
        stream, val_sets, n_tokens = datasets(run, t.cfg)
        start = restore(t, run)
    state = start.state if start.state is not None else t.fresh_state(start.params)
    step, position, frozen, last = start.step, start.position, start.frozen, {}
    with stop_signals() as signalled, Progress(run, t, step, n_tokens) as progress:
        while step < run.total_steps:
            local = t.local_batch(stream, position)
            error = bad_ids(local, t.cfg.n_vocab, "train_set")
            if error is not None and jax.process_count() == 1:
                raise error  # no one else to tell: before the step
            flags = STOP * bool(signalled) | ERROR * (error is not None)
            state, m = t.step(state, t.global_batch(local), frozen, t.halt(flags))
            step, position = step + 1, position + run.gradient_accumulation_steps * t.batch
            halt = int(m["halt"])  # every process's flags: all of them stop, or fail, after the same step
            if halt & ERROR:
                runtime.agree(error)
            final = step == run.total_steps or halt & STOP
            evaluating = run.val_every > 0 and step % run.val_every == 0 or step == run.total_steps
            saving = run.ckpt_every > 0 and step % run.ckpt_every == 0 or final
            if step % run.log_every == 0 or evaluating or saving:
                last = progress(step, m, lambda: t.validate(state["params"], frozen, val_sets, run.val_batches)
                                if evaluating else {})
            if saving:
                note(f"saved {save(run, t, state, step, position, start.adapted)}")
            if halt & STOP:
                note(f"stopped by a signal at step {step}: resume with the same command")
                return last
        if run.sample_tokens > 0:
            final_sample(run, t, state["params"], frozen)
    return last


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"JSON config (default {os.path.relpath(DEFAULT_CONFIG)})")
    ap.add_argument("--plan", action="store_true", help="print per-device memory of the training step and exit")
    ap.add_argument("--topology", help="with --plan: compile for this TPU topology (e.g. v5e:1x1, v3:2x2, v4:2x2x1) "
                                       "by the TPU compiler; needs libtpu (pip install 'jax[tpu]'), no TPU")
    ap.add_argument("--device_memory", type=float, metavar="GIB",
                    help="with --plan: each device's memory in GiB, for the verdict \"fits\" (default: the HBM of "
                         "the TPU planned for, or of tpu_size's v3 cores)")
    ap.add_argument("--benchmark", action="store_true", help="time training steps on random tokens and exit")
    ap.add_argument("--benchmark_steps", type=int, default=5)
    multi = ap.add_argument_group("many hosts", "one process per host (or per GPU) of one run; JAX detects Cloud "
                                  "TPU pod slices, Slurm and Open MPI by itself, elsewhere give all three")
    multi.add_argument("--coordinator_address", help="HOST:PORT of process 0, where the others connect")
    multi.add_argument("--num_processes", type=int, help="how many processes the run has")
    multi.add_argument("--process_id", type=int, help="this process's index, 0 to num_processes - 1")
    multi.add_argument("--heartbeat_timeout_seconds", type=int, default=runtime.HEARTBEAT_S,
                       help="a process silent this long is lost, and JAX ends the others (default %(default)s)")
    for key, default in KEYS.items():
        ap.add_argument(f"--{key}", metavar=type(default).__name__.upper(), help=f"(default {default!r})")
    args = ap.parse_args(argv)
    try:
        if not args.plan:  # --plan compiles for devices it does not own: it runs alone
            runtime.start(args.coordinator_address, args.num_processes, args.process_id,
                          args.heartbeat_timeout_seconds)
        # A config file missing on one host ends every process; --plan runs alone, and sets its device count
        # before JAX's backends start.
        with contextlib.nullcontext() if args.plan else runtime.agreed():
            overrides = {k: _parse_flag(k, v) for k, v in vars(args).items() if k in KEYS and v is not None}
            run = load_config(args.config, overrides)
        if args.plan:
            devices, topology = plan_devices(run, args.topology)
            out = plan(run, devices, topology, args.device_memory and round(args.device_memory * 2**30))
            print(json.dumps(out))
            if devices[0].platform == "cpu" and run.model("cpu").dtype != "float32":
                print("note: XLA:CPU computes bf16 and fp16 matmuls in fp32 (and may hold fp32 copies of whole bf16 "
                      "weight stacks): temp_bytes can differ from an accelerator's; --topology plans with the TPU "
                      "compiler", file=sys.stderr)
            if out["fits"] is False:
                need = (f"the compiler's {out['needed_bytes'] / 2**30:.2f} GiB of temporaries" if "needed_bytes" in out
                        else f"{out['total_bytes'] / 2**30:.2f} GiB")
                print(f"error: the step does not fit: {need} a device, {out['available_bytes'] / 2**30:.2f} GiB "
                      f"available; lower per_replica_batch, raise cores_per_replica, or set remat true", file=sys.stderr)
                return 1
        elif args.benchmark:
            record = benchmark(run, args.benchmark_steps)
            if runtime.is_main():
                print(json.dumps(record))
        else:
            train(run)
    except (ConfigError, ValueError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    runtime.keep_freed_host_memory()  # before JAX starts its threads
    sys.exit(main())

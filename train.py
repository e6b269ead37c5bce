"""Train GPT-J: small models anywhere, GPT-J-6B fine-tuning on a TPU v3-8. Resumable to the bit.

    python train.py                                   # small GPT-J on the bundled Shakespeare
    python train.py --config configs/6B_v3-8.json --init_from PATH --train_set 'data/*.jsonl'
    python train.py --config configs/6B_v3-8.json --plan      # per-device memory, without the devices
    python train.py --benchmark                       # tokens/s and MFU on random tokens
"""
import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt
import ckpt_peft
import config
import data
import decode
import gptj
import lora
import perf
import plan
import runtime
import shard
from config import ConfigError, Run
from metrics import Progress, note

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


def state_specs(state_shapes, mesh, fsdp=False):
    """Params split as shard.param_specs (fsdp: over dp too); optimizer state split over dp either way (ZeRO-1)."""
    pspecs = shard.param_specs(state_shapes["params"], lora.leaf_axes, fsdp)
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
        return shard.loss_fn(params, tokens, cfg, mesh, z_loss=run.z_loss, linear=linear, fsdp=run.fsdp,
                             sequence_parallel=run.sequence_parallel)

    def step(state, batch, frozen=None, halt=None):  # batch [grad_acc, batch, seq + 1]
        params, frozen = state["params"], {} if frozen is None else frozen

        def micro(acc, tokens):
            value, grads = jax.value_and_grad(loss)(params, tokens, frozen)
            return jax.tree.map(lambda a, g: a + g.astype(acc_dtype), acc, grads), value

        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, acc_dtype), params)
        grads, losses = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g, p: (g / batch.shape[0]).astype(p.dtype), grads, params)
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        count = state["opt_state"][-1].count  # the schedule's own step counter: the lr this step used
        metrics = {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads), "lr": schedule(run)(count)}
        return new, metrics | ({} if halt is None else {"halt": halt.max()})

    return opt, step


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
        try:
            shard.check(self.cfg, self.mesh, self.batch, run.seq if run.sequence_parallel else None, run.fsdp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
        self.shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), state_specs(shapes, self.mesh, run.fsdp),
                                      is_leaf=lambda x: isinstance(x, P))
        self.shapes = self._placed(shapes, self.shardings)
        frozen = jax.eval_shape(self.random_frozen, jax.random.PRNGKey(0)) if self.lora else {}
        self.frozen_shardings = shard.named(self.mesh, shard.param_specs(frozen, fsdp=run.fsdp)) if self.lora else {}
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
            lambda p, b, mask, f: shard.loss_fn(lora.combine(f, p), b, self.cfg, self.mesh, mask, linear=linear,
                                                fsdp=run.fsdp, sequence_parallel=run.sequence_parallel),
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
        return perf.flops_per_token(self.cfg, self.run.seq, adapters)

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
        frozen, base_cfg = ckpt.load_weights(run.init_from, mesh=t.mesh, dtype=cfg.dtype, fsdp=run.fsdp)
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
        params, init_cfg = ckpt.load_weights(run.init_from, mesh=t.mesh, dtype="float32", fsdp=run.fsdp)
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
    if run.fsdp and not t.lora:  # decoding holds mp slices of the whole model a device: halve them (bf16)
        params = jax.tree.map(lambda x: x.astype(t.cfg.dtype) if x.ndim >= 2 else x, params)  # vectors stay fp32
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"JSON config (default {os.path.relpath(config.DEFAULT_CONFIG)})")
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
    config.add_flags(ap)  # --KEY VALUE for every key of a config
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.plan:  # --plan compiles for devices it does not own: it runs alone
            runtime.start(args.coordinator_address, args.num_processes, args.process_id,
                          args.heartbeat_timeout_seconds)
        # A config file missing on one host ends every process; --plan runs alone, and sets its device count
        # before JAX's backends start.
        with contextlib.nullcontext() if args.plan else runtime.agreed():
            run = config.load_config(args.config, config.flags(args))
        if args.plan:
            devices, topology = plan.plan_devices(run, args.topology)
            device_bytes = args.device_memory and round(args.device_memory * 2**30)
            return plan.report(plan.plan(Trainer(run, devices), topology, device_bytes))
        elif args.benchmark:
            record = perf.benchmark(Trainer(run, hosts=runtime.hosts()), args.benchmark_steps)
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

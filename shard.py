"""Data and Megatron-style tensor parallelism for gptj.py, with explicit shard_map collectives.

The mesh has axes ('dp', 'mp'). Batches split over 'dp'. Weights split over 'mp':
    q/k/v_proj, fc_in   by output features (whole heads / d_ff slices)
    out_proj, fc_out    by input features, so each device's partial outputs need one psum per layer
    wte                 by vocab rows (each device embeds the ids it owns, then psum)
    lm_head             by vocab columns (the loss reduces the vocab slices with pmax/psum)
LayerNorms and fc_out's bias are replicated. The mesh, the model's partition specs and the shard_map wrappers
live here.

Two splits for training what one device cannot hold (docs/training.md#scaling):
    fsdp               every weight is also split over 'dp' along its embed axis (fp32 masters, gradients and
                       optimizer state alike); each layer all-gathers its weights inside the layer loop
                       (gptj.gather_weights), whose transpose, a reduce-scatter, delivers gradients already split
    sequence_parallel  the residual stream between layers is split over 'mp' along the sequence
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import gptj

DP, MP = "dp", "mp"


def make_mesh(dp: int, mp: int, devices=None) -> Mesh:
    """A (dp, mp) mesh with Auto axes; mp is the fastest-varying so a model replica sits on adjacent devices."""
    devices = jax.devices() if devices is None else devices
    if dp < 1 or mp < 1:
        raise ValueError(f"mesh dp={dp}, mp={mp}: both must be at least 1")
    if dp * mp > len(devices):
        raise ValueError(f"mesh dp={dp} x mp={mp} needs {dp * mp} devices but only {len(devices)} exist")
    grid = np.asarray(devices[: dp * mp]).reshape(dp, mp)
    return Mesh(grid, (DP, MP), axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_for(mp: int, devices=None, hosts: dict | None = None) -> Mesh:
    """All devices, mp of them per model replica and the rest data parallel, in host_order."""
    devices = host_order(jax.devices() if devices is None else list(devices), mp, hosts)
    return make_mesh(len(devices) // mp, mp, devices)


def host_order(devices: list, mp: int, hosts: dict | None = None) -> list:
    """Devices ordered by host, then process, then id, so that consecutive groups of mp (a model replica) are on
    one host: the mp collectives run every layer, and a host's own links (ICI, NVLink) are the fast ones; dp runs
    across hosts. hosts: {process index: host}; default one host per process (a TPU host, or simulated devices);
    runtime.hosts() tells a real run's (Slurm on GPUs runs a process per GPU, several on a host)."""
    if mp < 1 or len(devices) % mp:
        raise ValueError(f"cores_per_replica={mp} does not divide the {len(devices)} devices: pick a divisor")
    hosts = hosts or {}
    host_of = lambda d: hosts.get(d.process_index, f"process {d.process_index}")
    by_process = sorted(devices, key=lambda d: (d.process_index, d.id))
    rank = {h: i for i, h in enumerate(dict.fromkeys(map(host_of, by_process)))}
    ordered = sorted(by_process, key=lambda d: rank[host_of(d)])  # stable: process, then id, within a host
    for host in rank:
        n = sum(host_of(d) == host for d in ordered)
        if n % mp == 0:
            continue
        if getattr(ordered[0], "platform", None) == "tpu" and mp % n == 0:
            continue  # ICI links a TPU slice's hosts as fast as a host's own chips: a replica may span whole hosts
        raise ValueError(f"cores_per_replica={mp} cannot be placed: {host} has {n} devices, and a model replica "
                         f"stays within one host (its mp collectives run every layer, and links between hosts are "
                         f"slow outside a TPU slice): choose a divisor of {n}")
    return ordered


def local_rows(sharding, shape, axis: int) -> slice:
    """The rows along `axis` of a global array of `shape` that this process's devices hold, as one slice: what
    the process builds of a batch (the mesh puts each process's devices at consecutive dp positions)."""
    spans = {idx[axis].indices(shape[axis])[:2] for idx in sharding.addressable_devices_indices_map(shape).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"this process holds rows {sorted(spans)} of the batch, not one run of them")
    return slice(start, stop)


def check(cfg: gptj.Config, mesh: Mesh, batch: int | None = None, seq: int | None = None, fsdp=False):
    """Raise a ValueError naming the first split that does not divide evenly. seq: sequence parallel's length."""
    mp, dp = mesh.shape[MP], mesh.shape[DP]
    for name, size in [("n_head", cfg.n_head), ("d_ff", cfg.d_ff), ("n_vocab", cfg.n_vocab)]:
        if size % mp:
            raise ValueError(f"{name}={size} is not divisible by mp={mp}: choose mp dividing it")
    if batch is not None and batch % dp:
        raise ValueError(f"batch size {batch} is not divisible by dp={dp}: use a multiple of {dp}")
    if fsdp and cfg.d_model % dp:
        raise ValueError(f"fsdp splits d_model={cfg.d_model} over dp={dp}, which does not divide it: choose "
                         f"cores_per_replica so that dp does, or fsdp false")
    if seq is not None and seq % mp:
        raise ValueError(f"sequence_parallel splits seq={seq} over mp={mp}, which does not divide it: choose seq "
                         f"a multiple of {mp}, or sequence_parallel false")


# Logical axes split over 'mp' (of gptj.PARAMS's, and of any other a leaf_axes function names, such as LoRA's
# "lora_rank", none is); every other axis is whole on each device.
MP_AXES = ("vocab", "heads", "mlp")


def model_axes(name: str) -> tuple:
    """A model leaf's logical axes, as gptj.PARAMS declares them."""
    return gptj.PARAMS[name][0]


def param_specs(params=None, leaf_axes=model_axes, fsdp=False) -> dict:
    """PartitionSpecs for a params pytree (default: gptj's whole tree), each from its leaf's logical axes:
    leaf_axes("h.q_proj.weight") -> ("layers", "embed", "heads"). A tree with leaves of its own (lora.py's adapters)
    passes a leaf_axes that knows them. Stacked layers keep their leading layer axis whole; per-layer params
    (decode.unstack: lists of layers) have no layer axis. fsdp: gptj's own leaves also split their embed axis
    over 'dp', as gptj.gather_weights expects them."""
    if params is None:
        params = gptj.nest(dict.fromkeys(gptj.PARAMS, 0))

    def spec(path, _):
        per_layer = any(isinstance(k, jax.tree_util.SequenceKey) for k in path)
        name = ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        axes = leaf_axes(name)
        split = lambda a: MP if a in MP_AXES else DP if fsdp and a == "embed" and name in gptj.PARAMS else None
        return P(*map(split, axes[1:] if per_layer else axes))
    return jax.tree_util.tree_map_with_path(spec, params)


def cache_specs(cache) -> dict:
    """KV cache split over dp by rows and over mp by heads, stacked or per layer."""
    kv = P(DP, MP, None, None)
    if isinstance(cache["k"], list):
        return {"k": [kv] * len(cache["k"]), "v": [kv] * len(cache["v"]), "length": P(DP)}
    return {"k": P(None, *kv), "v": P(None, *kv), "length": P(DP)}


def zero_spec(spec: P, shape, dp: int) -> P:
    """ZeRO-1: additionally split an optimizer-state leaf over 'dp' on its first free dimension that divides (a
    leaf of an FSDP param is split over 'dp' already)."""
    axes = list(spec) + [None] * (len(shape) - len(spec))
    if DP in axes:
        return P(*axes)
    for i, (ax, n) in enumerate(zip(axes, shape)):
        if ax is None and n % dp == 0 and n >= dp:
            axes[i] = DP
            return P(*axes)
    return P(*axes)


def host(x) -> np.ndarray:
    """An array's whole value on this host, gathered from the other processes where it spans them."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def place(tree, mesh: Mesh, specs):
    """Put a host pytree onto the mesh with the given specs."""
    return jax.device_put(tree, named(mesh, specs))


def place_params(params, mesh: Mesh):
    return place(params, mesh, param_specs(params))


def _axes_of(linear):
    """The logical axes of the params that a linear hook computes with: a hook whose params hold leaves of their
    own (lora.linear_fn's adapters) names their axes as its leaf_axes attribute."""
    return getattr(linear, "leaf_axes", model_axes)


def forward(params, tokens, cfg: gptj.Config, mesh: Mesh, cache=None, linear=gptj.dense, fsdp=False,
            sequence_parallel=False):
    """gptj.forward on the mesh: logits [batch, seq, n_vocab] split over (dp, -, mp); cache split likewise.
    fsdp, sequence_parallel: as loss_fn, for training's forward passes (decoding keeps the psum path)."""
    if sequence_parallel and cache is not None:
        raise ValueError("sequence_parallel is for training: decode with a cache without it")
    check(cfg, mesh, tokens.shape[0], tokens.shape[1] if sequence_parallel else None, fsdp)

    def local(params, tokens, cache):
        return gptj.forward(params, tokens, cfg, cache=cache, mp=MP, linear=linear, fsdp=DP if fsdp else None,
                            sequence_parallel=sequence_parallel)

    cache_spec = None if cache is None else cache_specs(cache)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(param_specs(params, _axes_of(linear), fsdp), P(DP, None), cache_spec),
        out_specs=(P(DP, None, MP), cache_spec),
    )(params, tokens, cache)


def loss_fn(params, tokens, cfg: gptj.Config, mesh: Mesh, mask=None, z_loss=0.0, linear=gptj.dense, fsdp=False,
            sequence_parallel=False):
    """gptj.loss_fn on the mesh: the mean over all dp shards' unmasked tokens, vocab never gathered. fsdp: params
    come split as param_specs(..., fsdp=True) says, and their gradients leave split the same way."""
    check(cfg, mesh, tokens.shape[0], tokens.shape[1] - 1 if sequence_parallel else None, fsdp)
    mask = jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32) if mask is None else mask

    def local(params, tokens, mask):
        logits, _ = gptj.forward(params, tokens[:, :-1], cfg, mp=MP, linear=linear, fsdp=DP if fsdp else None,
                                 sequence_parallel=sequence_parallel)
        losses = gptj.cross_entropy(logits, tokens[:, 1:], z_loss, mp=MP)
        mask = mask.astype(jnp.float32)
        total, count = jax.lax.psum(((losses * mask).sum(), mask.sum()), DP)
        return total / jnp.maximum(count, 1.0)

    specs = param_specs(params, _axes_of(linear), fsdp)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(DP, None), P(DP, None)), out_specs=P(),
                         )(params, tokens, mask)

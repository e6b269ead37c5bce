"""mesh-transformer-jax's own checkpoints: shard_{0..S-1}/{0..15}.npz, one folder per model-parallel shard, read
with that project's JSON config. ckpt.py tells the formats apart and loads through `sources`."""
import math
import os
import re
import struct
import zipfile

import jax.numpy as jnp
import numpy as np

import ckpt_io
import gptj

ORIG = "causal_transformer_shard/~/"
# our leaf -> (Haiku module/name; layers' names are under layer_{i}/~/) and how the S shard pieces combine:
# concatenated on an axis of the full tensor, summed (partial biases), or shard 0's copy (LayerNorms).
ORIG_LAYER = {
    "h.q_proj.weight": ("linear/w", 1), "h.v_proj.weight": ("linear_1/w", 1), "h.k_proj.weight": ("linear_2/w", 1),
    "h.out_proj.weight": ("linear_3/w", 0), "h.fc_in.bias": ("linear_4/b", 0), "h.fc_in.weight": ("linear_4/w", 1),
    "h.fc_out.bias": ("linear_5/b", "sum"), "h.fc_out.weight": ("linear_5/w", 0),
    "h.ln_1.bias": ("replicated_layer_norm/offset", "first"), "h.ln_1.weight": ("replicated_layer_norm/scale", "first"),
}
ORIG_TOP = {
    "wte": ("embedding_shard/~/linear/w", 0), "wte_bias": ("embedding_shard/~/linear/b", "sum"),
    "lm_head.bias": ("projection_shard/~/linear/b", 0), "lm_head.weight": ("projection_shard/~/linear/w", 1),
    "ln_f.bias": ("projection_shard/~/replicated_layer_norm/offset", "first"),
    "ln_f.weight": ("projection_shard/~/replicated_layer_norm/scale", "first"),
}


def _orig_config(config):
    """gptj.Config and cores_per_replica from the original project's JSON config (a path or a dict)."""
    c = config if isinstance(config, dict) else ckpt_io.read_json(config)
    try:
        if c.get("pe", "rotary") != "rotary" or c.get("norm", "layernorm") != "layernorm":
            raise ValueError(f"{config}: pe={c.get('pe')}, norm={c.get('norm')} is not GPT-J (rotary, layernorm)")
        cfg = ckpt_io.make_config("config" if isinstance(config, dict) else config, n_vocab=c["n_vocab"], n_ctx=c["seq"],
                      d_model=c["d_model"], n_layer=c["layers"], n_head=c["n_heads"], rotary_dim=c["pe_rotary_dims"])
        return cfg, int(c["cores_per_replica"])
    except KeyError as e:
        raise ValueError(f"{config} lacks {e}: is it the original project's JSON config?") from None


def _npz_arrays(f) -> list:
    """Memory-mapped arrays of an uncompressed .npz (np.savez), in arr_0, arr_1, ... order; V2 read as bfloat16."""
    try:
        with zipfile.ZipFile(f) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{f}: not a readable .npz, truncated? ({e})") from None
    numbered = []
    for m in members:
        match = re.fullmatch(r"arr_(\d+)\.npy", m.filename)
        if not match or m.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{f}: member {m.filename} is not an uncompressed arr_N.npy")
        numbered.append((int(match.group(1)), m))
    arrays, size = [], os.path.getsize(f)
    with open(f, "rb") as fh:
        for _, m in sorted(numbered, key=lambda t: t[0]):
            fh.seek(m.header_offset + 26)  # local file header: name and extra-field lengths sit at bytes 26..30
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            fh.seek(m.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = header[version](fh)
            dtype = jnp.dtype(jnp.bfloat16) if dtype == np.dtype("V2") else dtype  # numpy stored bf16 as raw V2
            if fortran or dtype.hasobject or fh.tell() + math.prod(shape) * dtype.itemsize > size:
                raise ValueError(f"{f}: {m.filename} is truncated or not a plain array")
            arrays.append(ckpt_io.memmap(f, shape, dtype, fh.tell()))
    return arrays


def _orig_layout(n_layer):
    """[(Haiku 'module/name', our leaf, how)] in the order jax flattens the params dict: modules sorted by
    full path (so layers come as layer_0, layer_1, layer_10, ..., layer_2, ...), names sorted within each."""
    rows = [(ORIG + n, leaf, how) for leaf, (n, how) in ORIG_TOP.items()]
    rows += [(f"{ORIG}layer_{i}/~/{n}", leaf, how) for i in range(n_layer) for leaf, (n, how) in ORIG_LAYER.items()]
    return sorted(rows, key=lambda row: row[0].rsplit("/", 1))


def _combine(parts, how, idx):
    """Index `idx` of the full tensor assembled from the per-shard arrays `parts`."""
    if how == "first":
        return parts[0][idx]
    if how == "sum":
        total = np.zeros(parts[0][idx].shape, np.float32)
        for p in parts:
            total += p[idx]
        return total
    n = parts[0].shape[how]  # concatenated on axis `how`: read only the shards the slice touches
    start, stop, _ = idx[how].indices(n * len(parts))
    pieces = []
    for s in range(start // n, max(start // n + 1, -(-stop // n))):
        local = list(idx)
        local[how] = slice(max(start - s * n, 0), min(stop - s * n, n))
        pieces.append(parts[s][tuple(local)])
    return np.concatenate(pieces, axis=how)


def sources(path, config):
    if config is None:
        raise ValueError(f"{path} is an original mesh-transformer-jax checkpoint: pass its JSON config with --config")
    cfg, n_shards = _orig_config(config)
    for name, size in [("n_vocab", cfg.n_vocab), ("n_heads", cfg.n_head), ("d_ff", cfg.d_ff)]:
        if size % n_shards:
            raise ValueError(f"{config}: {name}={size} is not divisible by cores_per_replica={n_shards}")
    shard_dirs = [os.path.isdir(os.path.join(path, f"shard_{s}")) for s in (n_shards - 1, n_shards)]
    if shard_dirs != [True, False]:
        raise ValueError(f"{path}: shard folders do not match cores_per_replica={n_shards} in {config}")
    layout = _orig_layout(cfg.n_layer)
    full_shapes = {**gptj.param_shapes(cfg), "wte_bias": (cfg.d_model,)}
    shards = []  # per shard: {Haiku name: memmap}
    for s in range(n_shards):
        folder = os.path.join(path, f"shard_{s}")
        files = [_npz_arrays(os.path.join(folder, f"{i}.npz")) for i in range(16)]
        leaves = [a for arrays in files for a in arrays]
        k, m = divmod(len(leaves), 16)  # the writer split the flat state into 16 contiguous files like this
        if [len(a) for a in files] != [k + 1] * m + [k] * (16 - m):
            raise ValueError(f"{folder}: its npz files hold {[len(a) for a in files]} arrays, not a 16-way split")
        n_opt = len(leaves) - len(layout) - 1  # optimizer leaves come first (full checkpoints), step last
        if n_opt < 0 or leaves[-1].size != 1:
            raise ValueError(f"{folder} holds {len(leaves)} arrays, which does not fit {cfg.n_layer} layers: "
                             "wrong --config?")
        for j, ((name, leaf, how), arr) in enumerate(zip(layout, leaves[n_opt:-1])):
            want = full_shapes[leaf][1:] if leaf in ORIG_LAYER else full_shapes[leaf]
            want = tuple(d // n_shards if i == how else d for i, d in enumerate(want))
            if arr.shape != want:
                raise ValueError(f"{folder}: leaf {name} (array {n_opt + j}) has shape {arr.shape}, "
                                 f"config implies {want}: wrong --config?")
        shards.append({name: arr for (name, _, _), arr in zip(layout, leaves[n_opt:-1])})

    def combine(name, how, idx):
        return _combine([sh[ORIG + name] for sh in shards], how, idx)
    sources = {}
    for leaf, shape in gptj.param_shapes(cfg).items():
        if leaf in ORIG_LAYER:
            name, how = ORIG_LAYER[leaf]
            read = ckpt_io.stacked(cfg.n_layer, lambda i, idx, n=name, h=how: combine(f"layer_{i}/~/{n}", h, idx))
            dtype = shards[0][f"{ORIG}layer_0/~/{name}"].dtype
        else:
            name, how = ORIG_TOP[leaf]
            read = lambda idx, dt, n=name, h=how: np.asarray(combine(n, h, idx), dt)
            dtype = shards[0][ORIG + name].dtype
        if leaf == "wte":  # a linear on one-hot ids: its summed bias is added to every embedding row
            read = lambda idx, dt: (combine(ORIG_TOP["wte"][0], 0, idx).astype(np.float32)
                                    + combine(ORIG_TOP["wte_bias"][0], "sum", idx[1:])).astype(dt)
        if leaf == "wte" or how == "sum":  # computed from several stored leaves: keep the fp32 of the sum
            dtype = jnp.dtype(jnp.float32)
        sources[leaf] = (shape, dtype, read)
    return cfg, sources



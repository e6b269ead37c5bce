"""Checkpoints: GPT-J weights in and out of this project.

Three layouts, told apart by `_open` (behind `load_weights`) from what the folder holds:
  native    meta.json + one raw little-endian `<leaf.path>.bin` per pytree leaf (memory-mappable); `save`/`load`
            here. Arrays that span processes are written jointly: a file per distinct block ("pieces" in
            meta.json), and meta.json last, as the commit marker.
            A folder of `step_<8 digits>` native checkpoints (a training run) means its newest complete one.
            A LoRA run's checkpoints hold only adapters and name their base: they read as the merged weights.
  HF        a HuggingFace GPT-J folder (ckpt_hf.py).
  original  mesh-transformer-jax's shard_{0..S-1}/{0..15}.npz, read with that project's JSON config (ckpt_orig.py).

Tensors stream one at a time and go straight to their device shards (see `_place`), so host memory holds
about one tensor beyond the target arrays, and each process reads only the blocks its own devices hold. A single
process's writers fill a sibling temp folder and rename it into place, so a failed or interrupted write leaves
nothing at the destination; processes writing together rely on the commit marker instead.

CLI: python ckpt.py SRC DST --to native|hf|peft [--config ORIGINAL.json] [--dtype float32|bfloat16|float16] [--force]
(PEFT adapter folders: ckpt_peft.py.)
"""
import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding

import gptj
import lora
import runtime
import shard

FORMAT, VERSION = "gptj-jax", 1
STEP_DIR = re.compile(r"step_(\d{8})")
EOT = 50256


# ---------------------------------------------------------------- shared helpers

def _path_str(path) -> str:
    """'opt_state.0.mu.h.fc_in.weight': dict keys, attribute names and sequence indices joined by dots."""
    parts = []
    for k in path:
        attr = next(a for a in ("key", "name", "idx") if hasattr(k, a))
        parts.append(str(getattr(k, attr)))
    return ".".join(parts)


def _flat(tree, is_leaf=None) -> dict:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _shape_tree(sources) -> dict:
    return gptj.nest({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype, _) in sources.items()})


def _full(shape):
    return tuple(slice(None) for _ in shape)


def _transpose(a):
    """a.T as a new C-ordered array, copied 64 rows at a time: one big strided copy misses cache, ~10x slower."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], 64):
        out[:, i:i + 64] = a[i:i + 64].T
    return out


def _memmap(file, shape, dtype, offset=0):
    if math.prod(shape) == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(file, dtype, "r", offset, (math.prod(shape),)).reshape(shape)


def _stacked(n_layer, read_layer):
    """read(index, dtype) of a [n_layer, ...] leaf, filled layer by layer into one buffer: the only full copy."""
    def read(idx, dtype):
        layers = range(n_layer)[idx[0]]
        out = None
        for j, i in enumerate(layers):
            part = read_layer(i, idx[1:])
            out = np.empty((len(layers),) + part.shape, dtype) if out is None else out
            out[j] = part
        return out
    return read


def _place(shape, dtype, sharding: Sharding, read):
    """A jax.Array built one distinct shard at a time from read(index, dtype); replicas share one read.
    Unlike make_array_from_callback, which gathers every shard on the host first, host memory stays ~one shard."""
    groups = {}
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n) for s, n in zip(idx, shape))
        groups.setdefault(key, (idx, []))[1].append(device)
    arrays = []
    for idx, devices in groups.values():
        host = read(idx, dtype)
        arrays += jax.block_until_ready([jax.device_put(host, d) for d in devices])
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _leaves(sources: dict, dtype=None, shardings=None, progress=False):
    """Yield (name, array) per source leaf, host numpy or placed with shardings[name]; progress on stderr."""
    total = sum(math.prod(s) * jnp.dtype(dtype or d).itemsize for s, d, _ in sources.values())
    tty = sys.stderr.isatty()
    show = progress and (total > 1e9 or tty)
    done = 0
    for i, (name, (shape, src_dtype, read)) in enumerate(sources.items()):
        dt = jnp.dtype(dtype or src_dtype)
        sharding = None if shardings is None else shardings[name]
        yield name, read(_full(shape), dt) if sharding is None else _place(shape, dt, sharding, read)
        done += math.prod(shape) * dt.itemsize
        if show:
            end = "\n" if (not tty or i + 1 == len(sources)) else ""
            print(f"\rloading {i + 1}/{len(sources)} tensors, {done / 1e9:.1f}/{total / 1e9:.1f} GB",
                  end=end, file=sys.stderr, flush=True)


def _require(module):
    """An optional package (safetensors, torch), or a one-line error saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this needs the optional package {module.split('.')[0]}: pip install it") from None


def read_json(f) -> dict:
    try:
        with open(f) as fh:
            out = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{f}: not a JSON object")
    return out


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_dir(dst, force):
    """Yield a sibling temp folder to fill; on success it replaces dst with one rename, on error it vanishes."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not force:
        raise ValueError(f"{dst} already exists: pass --force (force=True) to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{dst}.tmp-{os.getpid()}", f"{dst}.old-{os.getpid()}"
    for stale in (tmp, old):  # left by an earlier crashed process with our pid
        _remove(stale)
    os.mkdir(tmp)
    mode = os.stat(tmp).st_mode & 0o666  # what the umask lets open() give a file; safetensors makes 0600
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(dst):  # move the old one aside so dst is never missing a complete checkpoint for long
        os.replace(dst, old)
    os.replace(tmp, dst)
    _fsync(parent)
    _remove(old)


def _remove(path):
    """Delete a folder tree, file or link if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------- native format

def _save_items(dst, items, cfg: gptj.Config, extra=None, force=False):
    """Write (leaf name, array) pairs, one leaf in host memory at a time, meta.json last."""
    with _atomic_dir(dst, force) as tmp:
        leaves = {}
        for name, x in items:
            if not name or "/" in name or name.startswith(".") or name in leaves:
                raise ValueError(f"cannot store leaf {name!r}: bad or duplicate name")
            x = np.asarray(x)
            x = np.asarray(x, x.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray would make 0-d 1-d)
            with open(os.path.join(tmp, name + ".bin"), "wb") as f:
                f.write(x.reshape(-1).view(np.uint8).data)
            leaves[name] = {"shape": list(x.shape), "dtype": x.dtype.name}
            del x
        meta = {**(extra or {}), "format": FORMAT, "version": VERSION, "config": dataclasses.asdict(cfg),
                "leaves": leaves}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)


def save(path, tree, cfg: gptj.Config, extra: dict | None = None, *, force: bool = False):
    """Store any pytree of arrays (e.g. {"params": ..., "opt_state": ...}) as a native checkpoint at `path`.
    Sharded jax arrays are fetched leaf by leaf. extra: JSON-able items added to meta.json (step, data position).
    Arrays that span processes are written by all of them together (_save_jointly): call it on every process."""
    if jax.process_count() > 1:
        return _save_jointly(path, tree, cfg, extra, force)
    items = ((name, np.asarray(x)) for name, x in _flat(tree).items())  # lazy: one leaf at a time
    _save_items(path, items, cfg, extra, force)


def _save_jointly(dst, tree, cfg: gptj.Config, extra, force):
    """Every process writes the distinct blocks whose first copy its devices hold, one file each, straight into
    dst on a filesystem that all of them share; once all have written, process 0 writes meta.json, the commit
    marker: a folder without it is no checkpoint (latest() skips it). Nothing is renamed across hosts (Cloud
    Storage FUSE has no atomic folder rename). Errors anywhere end every process (runtime.agree)."""
    main, error = jax.process_index() == 0, None
    dst = os.path.abspath(dst)
    if main:
        try:
            if os.path.lexists(dst) and not force:
                raise ValueError(f"{dst} already exists: pass --force (force=True) to overwrite it")
            if os.path.lexists(dst):  # aside first: a half-deleted folder is never seen as a checkpoint
                doomed = f"{dst}.old-{os.getpid()}"
                os.replace(dst, doomed)
                shutil.rmtree(doomed)
            os.makedirs(dst)
        except (OSError, ValueError) as e:
            error = e
    runtime.agree(error)
    leaves = {}
    try:
        for name, x in _flat(tree).items():
            blocks = {tuple(s.indices(n)[:2] for s, n in zip(idx, x.shape)): None
                      for idx in x.sharding.devices_indices_map(x.shape).values()}
            file = lambda block: name + ".bin" if len(blocks) == 1 else f"{name}@{'-'.join(str(a) for a, _ in block)}.bin"
            dtype = x.dtype.newbyteorder("<")
            for part in x.addressable_shards:
                if part.replica_id == 0:
                    block = tuple(s.indices(n)[:2] for s, n in zip(part.index, x.shape))
                    with open(os.path.join(dst, file(block)), "wb") as f:
                        f.write(np.asarray(part.data, dtype, order="C").reshape(-1).view(np.uint8).data)
                        os.fsync(f.fileno())
            leaves[name] = {"shape": list(x.shape), "dtype": x.dtype.name}
            if len(blocks) > 1:
                leaves[name]["pieces"] = [{"file": file(b), "start": [a for a, _ in b], "stop": [e for _, e in b]}
                                          for b in blocks]
    except (OSError, ValueError) as e:
        error = e
    runtime.agree(error)  # every piece is on disk
    if main:
        try:
            meta = {**(extra or {}), "format": FORMAT, "version": VERSION, "config": dataclasses.asdict(cfg),
                    "leaves": leaves, "processes": jax.process_count()}
            tmp = os.path.join(dst, f".meta.json.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(dst, "meta.json"))
            _fsync(dst)
        except OSError as e:
            error = e
    runtime.agree(error)  # nobody goes on (or prunes) before the checkpoint is complete


def read_meta(path) -> dict:
    meta = read_json(os.path.join(path, "meta.json"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("leaves"), dict):
        raise ValueError(f"{os.path.join(path, 'meta.json')}: not a {FORMAT} version {VERSION} checkpoint")
    return meta


def _native_sources(path):
    """meta.json and {leaf name: (shape, dtype, read(index, dtype))} over memmaps, after checking every file size.
    A leaf is one file, or pieces (blocks of it, one file each) when processes wrote it jointly."""
    meta = read_meta(path)
    sources = {}
    for name, info in meta["leaves"].items():
        try:
            shape, dtype = info["shape"], jnp.dtype(info["dtype"])
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                raise TypeError(f"shape {shape!r} is not a list of sizes")
            shape = tuple(shape)
            pieces = [(p["file"], tuple(p["start"]), tuple(p["stop"])) for p in info.get("pieces", ())]
            if any(len(a) != len(shape) or len(b) != len(shape) or "/" in f or
                   not all(0 <= i < j <= n for i, j, n in zip(a, b, shape)) for f, a, b in pieces):
                raise TypeError("a piece outside the leaf")
            if pieces and sum(math.prod(j - i for i, j in zip(a, b)) for _, a, b in pieces) != math.prod(shape):
                raise TypeError("pieces that do not cover the leaf")
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: bad meta.json entry for {name} ({e})") from None
        maps = [(a, _mapped(os.path.join(path, f), tuple(j - i for i, j in zip(a, b)), dtype)) for f, a, b in pieces]
        if not pieces:
            mm = _mapped(os.path.join(path, name + ".bin"), shape, dtype)
            sources[name] = (shape, dtype, lambda idx, dt, mm=mm: np.asarray(mm[idx], dt))
        else:
            sources[name] = (shape, dtype, lambda idx, dt, shape=shape, maps=maps: _assemble(idx, dt, shape, maps))
    return meta, sources


def _mapped(f, shape, dtype):
    want = math.prod(shape) * dtype.itemsize
    size = os.path.getsize(f) if os.path.isfile(f) else None
    if size != want:
        raise ValueError(f"{f}: {'missing' if size is None else f'{size} bytes'}, expected {want} "
                         f"for {shape} {dtype.name}: truncated or corrupt checkpoint")
    return _memmap(f, shape, dtype)


def _assemble(idx, dtype, shape, maps):
    """The block `idx` of a leaf stored as pieces [(start, memmap)]: only the overlapping parts are read."""
    want = [s.indices(n)[:2] for s, n in zip(idx, shape)]
    out = np.empty([b - a for a, b in want], dtype)
    for start, mm in maps:
        lo = [max(a, s) for (a, _), s in zip(want, start)]
        hi = [min(b, s + n) for (_, b), s, n in zip(want, start, mm.shape)]
        if all(l < h for l, h in zip(lo, hi)):
            out[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, want))] = \
                mm[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))]
    return out


def meta_config(meta, where="meta.json") -> gptj.Config:
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{where}: no 'config' object")
    known = {f.name for f in dataclasses.fields(gptj.Config)}
    return _config(where, **{k: v for k, v in meta["config"].items() if k in known})


def _config(where, **values) -> gptj.Config:
    """gptj.Config from values read out of a file: a wrong type or value is a ValueError naming the file."""
    for k, v in values.items():
        want = type(getattr(gptj.GPTJ_6B, k))
        if not (type(v) is want or want is float and type(v) is int):
            raise ValueError(f"{where}: {k} is {v!r}, not {'an' if want is int else 'a'} {want.__name__}")
    try:
        return gptj.Config(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load(path, like=None, mesh=None, specs=None, dtype=None):
    """Read a native checkpoint. like: a pytree of arrays/ShapeDtypeStructs; the result has its structure and
    dtypes. like=None: the nested params dict, cast to `dtype` if given. Without mesh the leaves are host
    numpy arrays (memmaps when no cast is needed); with mesh + specs (PartitionSpecs or Shardings shaped like
    the result; default shard.param_specs for params) each leaf goes straight to its device shards."""
    meta, sources = _native_sources(path)
    if like is None:
        sources = {k[len("params."):]: v for k, v in sources.items() if k.startswith("params.")}
        if not sources:
            raise ValueError(f"{path}: the checkpoint holds no params")
        names, dtypes, treedef = list(sources), [dtype] * len(sources), None
        if specs is None and mesh is not None:  # a LoRA run's checkpoint holds adapters: lora knows their axes
            specs = shard.param_specs(_shape_tree(sources), lora.leaf_axes)
    else:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        names, dtypes = [_path_str(p) for p, _ in flat], [x.dtype for _, x in flat]
        for name, (_, x) in zip(names, flat):
            if name not in sources:
                raise ValueError(f"{path}: no leaf {name} in the checkpoint")
            if sources[name][0] != tuple(x.shape):
                raise ValueError(f"{path}: leaf {name} has shape {sources[name][0]}, expected {tuple(x.shape)}")
    shardings = None
    if specs is not None:
        flat_specs = _flat(specs, is_leaf=lambda s: isinstance(s, (P, Sharding)))
        missing = [n for n in names if n not in flat_specs]
        if missing or (mesh is None and not all(isinstance(s, Sharding) for s in flat_specs.values())):
            raise ValueError(f"no sharding for leaf {missing[0]}" if missing else "PartitionSpecs need a mesh")
        shardings = {n: s if isinstance(s, Sharding) else NamedSharding(mesh, s) for n, s in flat_specs.items()}
    out = [x for name, dt in zip(names, dtypes) for _, x in _leaves({name: sources[name]}, dt, shardings)]
    return gptj.nest(dict(zip(names, out))) if treedef is None else treedef.unflatten(out)


def _steps(model_dir):
    """[(step, path)] of the step_<8 digits> folders under model_dir, oldest first (temp folders excluded)."""
    if not os.path.isdir(model_dir):
        return []
    found = [(STEP_DIR.fullmatch(n), os.path.join(model_dir, n)) for n in os.listdir(model_dir)]
    return sorted((int(m.group(1)), p) for m, p in found if m and os.path.isdir(p))


def _complete(path) -> str | None:
    """None if path is a complete native checkpoint, else why not."""
    try:
        _native_sources(path)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def latest(model_dir) -> str | None:
    """The newest complete checkpoint under model_dir, skipping (with one line on stderr) damaged newer ones."""
    skipped = []
    for _, path in reversed(_steps(model_dir)):
        why = _complete(path)
        if why is None:
            if skipped:
                print(f"warning: skipping damaged checkpoint {'; '.join(skipped)}; using {path}", file=sys.stderr)
            return path
        skipped.append(f"{path} ({why})")
    if skipped:
        print(f"warning: no complete checkpoint in {model_dir}: {'; '.join(skipped)}", file=sys.stderr)
    return None


def prune(model_dir, keep_last: int, keep_every: int):
    """Delete all checkpoints but the newest keep_last complete ones (at least one) and those whose
    step % keep_every == 0."""
    steps = _steps(model_dir)
    good = [s for s, p in steps if _complete(p) is None]
    keep = set(good[-max(keep_last, 1):])
    for step, path in steps:
        if step not in keep and not (keep_every > 0 and step % keep_every == 0):
            doomed = f"{path}.tmp-{os.getpid()}"  # rename first: a half-deleted folder is never seen as a checkpoint
            os.replace(path, doomed)
            shutil.rmtree(doomed)


# ---------------------------------------------------------------- LoRA runs

def _checksums(x, offset: int) -> tuple:
    """Two exact sums of an array's bytes as 64-bit words, mod 2^64: plain, and weighted by word position (from
    offset) so that moved values count too. Integer arithmetic: the same on every machine."""
    b = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    words = np.concatenate([b, np.zeros(-len(b) % 8, np.uint8)]).view(np.uint64)
    weights = np.arange(offset, offset + len(words), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return int(words.sum(dtype=np.uint64)), int((words * weights).sum(dtype=np.uint64)), len(words)


def fingerprint(path, config=None) -> str:
    """A hash of a checkpoint's weights, to tell whether a LoRA run's base is still the one it was trained over:
    every leaf's name, shape and stored dtype, and two exact checksums of all of its bytes (_checksums), read a
    block of rows at a time. It reads the whole checkpoint once at memory speed and never rounds a float."""
    cfg, sources = _open(path, config)
    h = hashlib.sha256()
    for name, (shape, dtype, read) in _check_params(path, cfg, sources).items():
        rows = max(1, (1 << 26) // max(1, math.prod(shape[1:]) * jnp.dtype(dtype).itemsize))  # ~64 MB blocks
        plain = weighted = offset = 0
        for lo in range(0, shape[0], rows):
            idx = (slice(lo, min(lo + rows, shape[0])),) + _full(shape[1:])
            p, w, n = _checksums(read(idx, dtype), offset)
            plain, weighted, offset = (plain + p) % 2**64, (weighted + w) % 2**64, offset + n
        h.update(f"{name} {shape} {jnp.dtype(dtype).name} {plain} {weighted};".encode())
    return h.hexdigest()[:16]


def lora_meta(meta, path) -> dict:
    """The "lora" section of a LoRA run's meta.json, checked: a damaged one is a ValueError naming the file."""
    info = meta.get("lora")
    types = {"rank": int, "alpha": (int, float), "targets": list, "base": str, "base_fingerprint": str}
    bad = [k for k, t in types.items() if not isinstance(info, dict) or not isinstance(info.get(k), t)]
    if not bad and not set(info["targets"]) <= set(lora.TARGETS):
        bad = ["targets"]
    if bad:
        raise ValueError(f"{os.path.join(path, 'meta.json')}: its 'lora' section lacks a valid {bad[0]!r}: damaged")
    return info


def _adapted_sources(path, meta, adapters) -> dict:
    """A LoRA run's params: its base's, with scale * A B added to each adapted weight in float32, slice by slice
    as they are read (so a 6B model merges shard by shard while it loads). A merged weight is computed from
    several stored leaves, so it stays float32 (bf16 would round most of a small update away)."""
    info = lora_meta(meta, path)
    base = info["base"]
    if not os.path.isdir(base):
        raise ValueError(f"{path} holds LoRA adapters over {base}, which is not there: put the base back there")
    if fingerprint(base) != info["base_fingerprint"]:
        raise ValueError(f"{path} holds LoRA adapters over {base}, whose weights have changed since (another "
                         f"fingerprint): restore that base")
    base_cfg, sources = _open(base)
    sources = dict(_check_params(base, base_cfg, sources))
    scale = info["alpha"] / info["rank"]
    for target in info["targets"]:
        shape, dtype, read = sources[f"h.{target}.weight"]
        missing = [n for n in (f"h.{target}.lora_a", f"h.{target}.lora_b") if n not in adapters]
        if missing:
            raise ValueError(f"{path}: no params.{missing[0]}, which its meta.json names: damaged checkpoint")
        read_a, read_b = (adapters[f"h.{target}.lora_{x}"][2] for x in "ab")

        def merged(idx, dt, read=read, read_a=read_a, read_b=read_b):
            layers, rows, cols = idx
            delta = np.einsum("lir,lro->lio", read_a((layers, rows, slice(None)), np.float32),
                              read_b((layers, slice(None), cols), np.float32))
            return (read(idx, np.float32) + np.float32(scale) * delta).astype(dt)
        sources[f"h.{target}.weight"] = (shape, jnp.dtype(jnp.float32), merged)
    return sources


# ---------------------------------------------------------------- entry points

def _open(path, config=None):
    """(cfg, {param leaf: (shape, dtype, read)}) for whichever format `path` holds."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint folder")
    if os.path.isfile(os.path.join(path, "meta.json")):
        meta, sources = _native_sources(path)
        params = {k[len("params."):]: v for k, v in sources.items() if k.startswith("params.")}
        if "lora" in meta:  # a LoRA run: adapters only, over a base it names
            params = _adapted_sources(path, meta, params)
        return meta_config(meta, os.path.join(path, "meta.json")), params
    if os.path.isfile(os.path.join(path, "config.json")):
        import ckpt_hf  # each format's own file; this function is the one place that tells them apart
        return ckpt_hf.sources(path)
    if os.path.isdir(os.path.join(path, "shard_0")):
        import ckpt_orig
        return ckpt_orig.sources(path, config)
    if _steps(path):
        newest = latest(path)
        if newest is None:
            raise ValueError(f"{path}: no complete checkpoint among its step_* folders")
        return _open(newest)
    raise ValueError(f"{path} is not a GPT-J checkpoint: no meta.json (native), config.json (HuggingFace), "
                     f"shard_0/ (original) or step_* folders")


def read_config(path, config=None) -> gptj.Config:
    """The gptj.Config of whatever load_weights(path, config=config) would load, reading no weights."""
    return _open(path, config)[0]


def _check_params(path, cfg, sources) -> dict:
    """The sources of exactly gptj's params, in order, after checking they are all there with the right shapes."""
    for leaf, shape in gptj.param_shapes(cfg).items():
        if leaf not in sources or sources[leaf][0] != shape:
            got = sources[leaf][0] if leaf in sources else "missing"
            raise ValueError(f"{path}: param {leaf} is {got}, config implies {shape}")
    return {leaf: sources[leaf] for leaf in gptj.param_shapes(cfg)}


def load_weights(path, *, config=None, mesh=None, dtype=None, progress=True):
    """(params, cfg) from a native checkpoint or run folder, a HuggingFace GPT-J folder, or an original
    checkpoint (config: its JSON config). dtype: cast to it (default: as stored). With mesh, every leaf
    goes straight onto its shard.param_specs shards; without, leaves are host numpy arrays."""
    cfg, sources = _open(path, config)
    sources = _check_params(path, cfg, sources)
    shardings = None
    if mesh is not None:
        shard.check(cfg, mesh)
        specs = _flat(shard.param_specs(_shape_tree(sources)), lambda s: isinstance(s, P))
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    return gptj.nest(dict(_leaves(sources, dtype, shardings, progress))), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert GPT-J weights (native, HuggingFace or original) "
                                             "to native or HuggingFace.")
    ap.add_argument("src", help="checkpoint folder in any supported format")
    ap.add_argument("dst", help="output folder (must not exist unless --force)")
    ap.add_argument("--to", choices=["native", "hf", "peft"], required=True,
                    help="peft: a LoRA run's adapters as a PEFT adapter folder (native and hf: merged weights)")
    ap.add_argument("--config", help="the original project's JSON config (original checkpoints only)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored")
    ap.add_argument("--force", action="store_true", help="overwrite dst")
    args = ap.parse_args(argv)
    try:
        if args.to == "peft":
            import ckpt_peft
            ckpt_peft.export(args.src, args.dst, force=args.force)
            print(f"wrote {args.dst}", file=sys.stderr)
            return 0
        cfg, sources = _open(args.src, args.config)
        items = _leaves(_check_params(args.src, cfg, sources), args.dtype, progress=True)
        if args.to == "native":
            items = ((f"params.{k}", x) for k, x in items)
            _save_items(args.dst, items, cfg, {"source": os.path.abspath(args.src)}, args.force)
        else:
            import ckpt_hf
            ckpt_hf.save_items(args.dst, items, cfg, force=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the partial output is already removed
        print(f"interrupted: {args.dst} not written", file=sys.stderr)
        return 130
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

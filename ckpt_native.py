"""This project's own checkpoint format, and training runs' folders of them.

A checkpoint is a folder: meta.json (format, version, the model config, each leaf's shape and dtype, the run's
extra items such as step and data position) and one raw little-endian `<leaf.path>.bin` per pytree leaf, memory-
mapped on load. Arrays that span processes are written jointly: a file per distinct block ("pieces" in meta.json),
and meta.json last, as the commit marker. A run folder holds `step_<8 digits>` checkpoints; `latest` is its newest
complete one. A LoRA run's checkpoints hold only the adapters, with a "lora" section naming their base (ckpt.py
reads them as the merged weights).
"""
import dataclasses
import json
import math
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding

import ckpt_io
import gptj
import lora
import runtime
import shard

FORMAT, VERSION = "gptj-jax", 1
STEP_DIR = re.compile(r"step_(\d{8})")


def save_items(dst, items, cfg: gptj.Config, extra=None, force=False):
    """Write (leaf name, array) pairs, one leaf in host memory at a time, meta.json last."""
    with ckpt_io.atomic_dir(dst, force) as tmp:
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
    items = ((name, np.asarray(x)) for name, x in ckpt_io.flat(tree).items())  # lazy: one leaf at a time
    save_items(path, items, cfg, extra, force)


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
        for name, x in ckpt_io.flat(tree).items():
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
            ckpt_io.fsync(dst)
        except OSError as e:
            error = e
    runtime.agree(error)  # nobody goes on (or prunes) before the checkpoint is complete


def read_meta(path) -> dict:
    meta = ckpt_io.read_json(os.path.join(path, "meta.json"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("leaves"), dict):
        raise ValueError(f"{os.path.join(path, 'meta.json')}: not a {FORMAT} version {VERSION} checkpoint")
    return meta


def sources(path):
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
    return ckpt_io.memmap(f, shape, dtype)


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
    return ckpt_io.make_config(where, **{k: v for k, v in meta["config"].items() if k in known})


def load(path, like=None, mesh=None, specs=None, dtype=None):
    """Read a native checkpoint. like: a pytree of arrays/ShapeDtypeStructs; the result has its structure and
    dtypes. like=None: the nested params dict, cast to `dtype` if given. Without mesh the leaves are host
    numpy arrays (memmaps when no cast is needed); with mesh + specs (PartitionSpecs or Shardings shaped like
    the result; default shard.param_specs for params) each leaf goes straight to its device shards."""
    _, found = sources(path)
    if like is None:
        found = {k[len("params."):]: v for k, v in found.items() if k.startswith("params.")}
        if not found:
            raise ValueError(f"{path}: the checkpoint holds no params")
        names, dtypes, treedef = list(found), [dtype] * len(found), None
        if specs is None and mesh is not None:  # a LoRA run's checkpoint holds adapters: lora knows their axes
            specs = shard.param_specs(ckpt_io.shape_tree(found), lora.leaf_axes)
    else:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        names, dtypes = [ckpt_io.path_str(p) for p, _ in flat], [x.dtype for _, x in flat]
        for name, (_, x) in zip(names, flat):
            if name not in found:
                raise ValueError(f"{path}: no leaf {name} in the checkpoint")
            if found[name][0] != tuple(x.shape):
                raise ValueError(f"{path}: leaf {name} has shape {found[name][0]}, expected {tuple(x.shape)}")
    shardings = None
    if specs is not None:
        flat_specs = ckpt_io.flat(specs, is_leaf=lambda s: isinstance(s, (P, Sharding)))
        missing = [n for n in names if n not in flat_specs]
        if missing or (mesh is None and not all(isinstance(s, Sharding) for s in flat_specs.values())):
            raise ValueError(f"no sharding for leaf {missing[0]}" if missing else "PartitionSpecs need a mesh")
        shardings = {n: s if isinstance(s, Sharding) else NamedSharding(mesh, s) for n, s in flat_specs.items()}
    out = [x for name, dt in zip(names, dtypes) for _, x in ckpt_io.leaves({name: found[name]}, dt, shardings)]
    return gptj.nest(dict(zip(names, out))) if treedef is None else treedef.unflatten(out)


def step_folders(model_dir):
    """[(step, path)] of the step_<8 digits> folders under model_dir, oldest first (temp folders excluded)."""
    if not os.path.isdir(model_dir):
        return []
    found = [(STEP_DIR.fullmatch(n), os.path.join(model_dir, n)) for n in os.listdir(model_dir)]
    return sorted((int(m.group(1)), p) for m, p in found if m and os.path.isdir(p))


def _complete(path) -> str | None:
    """None if path is a complete native checkpoint, else why not."""
    try:
        sources(path)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def latest(model_dir) -> str | None:
    """The newest complete checkpoint under model_dir, skipping (with one line on stderr) damaged newer ones."""
    skipped = []
    for _, path in reversed(step_folders(model_dir)):
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
    steps = step_folders(model_dir)
    good = [s for s, p in steps if _complete(p) is None]
    keep = set(good[-max(keep_last, 1):])
    for step, path in steps:
        if step not in keep and not (keep_every > 0 and step % keep_every == 0):
            doomed = f"{path}.tmp-{os.getpid()}"  # rename first: a half-deleted folder is never seen as a checkpoint
            os.replace(path, doomed)
            shutil.rmtree(doomed)


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

"""What every checkpoint format shares: the leaf below the format readers and writers (ckpt_native.py, ckpt_hf.py,
ckpt_orig.py, ckpt_peft.py) and the dispatcher above them (ckpt.py).

A format reader describes a checkpoint as sources: {leaf name: (shape, dtype, read)}, where read(index, dtype)
returns the block `index` (a tuple of slices, one per axis) of that leaf as a numpy array of `dtype`. Nothing is
read before read is called, so a loader takes each leaf, or each device's block of it, one at a time (`leaves`,
`place`): host memory holds about one tensor beyond the arrays being built. Writers fill a sibling temp folder
(`atomic_dir`) that replaces the destination with one rename, so a failed write leaves nothing behind.
"""
import importlib
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

import gptj


def path_str(path) -> str:
    """'opt_state.0.mu.h.fc_in.weight': dict keys, attribute names and sequence indices joined by dots."""
    parts = []
    for k in path:
        attr = next(a for a in ("key", "name", "idx") if hasattr(k, a))
        parts.append(str(getattr(k, attr)))
    return ".".join(parts)


def flat(tree, is_leaf=None) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def shape_tree(sources) -> dict:
    return gptj.nest({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype, _) in sources.items()})


def full(shape):
    return tuple(slice(None) for _ in shape)


def transpose(a):
    """a.T as a new C-ordered array, copied 64 rows at a time: one big strided copy misses cache, and is slower
    (docs/performance.md)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], 64):
        out[:, i:i + 64] = a[i:i + 64].T
    return out


def memmap(file, shape, dtype, offset=0):
    if math.prod(shape) == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(file, dtype, "r", offset, (math.prod(shape),)).reshape(shape)


def stacked(n_layer, read_layer):
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


def place(shape, dtype, sharding: Sharding, read):
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


def leaves(sources: dict, dtype=None, shardings=None, progress=False):
    """Yield (name, array) per source leaf, host numpy or placed with shardings[name]; progress on stderr."""
    total = sum(math.prod(s) * jnp.dtype(dtype or d).itemsize for s, d, _ in sources.values())
    tty = sys.stderr.isatty()
    show = progress and (total > 1e9 or tty)
    done = 0
    for i, (name, (shape, src_dtype, read)) in enumerate(sources.items()):
        dt = jnp.dtype(dtype or src_dtype)
        sharding = None if shardings is None else shardings[name]
        yield name, read(full(shape), dt) if sharding is None else place(shape, dt, sharding, read)
        done += math.prod(shape) * dt.itemsize
        if show:
            end = "\n" if (not tty or i + 1 == len(sources)) else ""
            print(f"\rloading {i + 1}/{len(sources)} tensors, {done / 1e9:.1f}/{total / 1e9:.1f} GB",
                  end=end, file=sys.stderr, flush=True)


def require(module):
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


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(dst, force):
    """Yield a sibling temp folder to fill; on success it replaces dst with one rename, on error it vanishes."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not force:
        raise ValueError(f"{dst} already exists: pass --force (force=True) to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{dst}.tmp-{os.getpid()}", f"{dst}.old-{os.getpid()}"
    for stale in (tmp, old):  # left by an earlier crashed process with our pid
        remove(stale)
    os.mkdir(tmp)
    mode = os.stat(tmp).st_mode & 0o666  # what the umask lets open() give a file; safetensors makes 0600
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)
            fsync(os.path.join(tmp, name))
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(dst):  # move the old one aside so dst is never missing a complete checkpoint for long
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync(parent)
    remove(old)


def remove(path):
    """Delete a folder tree, file or link if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def make_config(where, **values) -> gptj.Config:
    """gptj.Config from values read out of a file: a wrong type or value is a ValueError naming the file."""
    for k, v in values.items():
        want = type(getattr(gptj.GPTJ_6B, k))
        if not (type(v) is want or want is float and type(v) is int):
            raise ValueError(f"{where}: {k} is {v!r}, not {'an' if want is int else 'a'} {want.__name__}")
    try:
        return gptj.Config(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

"""Checkpoints: GPT-J weights in and out of this project, whichever layout a folder holds.

  native    this project's own (ckpt_native.py): meta.json and one raw `<leaf.path>.bin` per leaf; a training run's
            folder of `step_<8 digits>` checkpoints means its newest complete one, and a LoRA run's checkpoints,
            which hold only adapters and name their base, read as the merged weights (here).
  HF        a HuggingFace GPT-J folder (ckpt_hf.py).
  original  mesh-transformer-jax's shard_{0..S-1}/{0..15}.npz, read with that project's JSON config (ckpt_orig.py).
  PEFT      a LoRA run's adapters in PEFT's format (ckpt_peft.py).

The modules form a stack: ckpt_io.py (what they share, and the `sources` contract every reader follows) under the
formats, this file on top: `_open` tells the layouts apart, `load_weights` loads any of them, the CLI converts.
Tensors stream one at a time and go straight to their device shards (`ckpt_io.place`), so host memory holds about
one tensor beyond the target arrays, and each process reads only the blocks its own devices hold.

CLI: python ckpt.py SRC DST --to native|hf|peft [--config ORIGINAL.json] [--dtype float32|bfloat16|float16] [--force]
"""
import argparse
import hashlib
import math
import os
import sys

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt_hf
import ckpt_io
import ckpt_native
import ckpt_orig
import ckpt_peft
import gptj
import shard
# The native format's API, as callers have always used it through this module.
from ckpt_io import read_json  # noqa: F401
from ckpt_native import latest, load, lora_meta, meta_config, prune, read_meta, save  # noqa: F401


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
            idx = (slice(lo, min(lo + rows, shape[0])),) + ckpt_io.full(shape[1:])
            p, w, n = _checksums(read(idx, dtype), offset)
            plain, weighted, offset = (plain + p) % 2**64, (weighted + w) % 2**64, offset + n
        h.update(f"{name} {shape} {jnp.dtype(dtype).name} {plain} {weighted};".encode())
    return h.hexdigest()[:16]


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
        meta, sources = ckpt_native.sources(path)
        params = {k[len("params."):]: v for k, v in sources.items() if k.startswith("params.")}
        if "lora" in meta:  # a LoRA run: adapters only, over a base it names
            params = _adapted_sources(path, meta, params)
        return meta_config(meta, os.path.join(path, "meta.json")), params
    if os.path.isfile(os.path.join(path, "config.json")):
        return ckpt_hf.sources(path)
    if os.path.isdir(os.path.join(path, "shard_0")):
        return ckpt_orig.sources(path, config)
    if ckpt_native.step_folders(path):
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


def load_weights(path, *, config=None, mesh=None, dtype=None, progress=True, fsdp=False):
    """(params, cfg) from a native checkpoint or run folder, a HuggingFace GPT-J folder, or an original
    checkpoint (config: its JSON config). dtype: cast to it (default: as stored). With mesh, every leaf
    goes straight onto its shard.param_specs(..., fsdp) shards; without, leaves are host numpy arrays."""
    cfg, sources = _open(path, config)
    sources = _check_params(path, cfg, sources)
    shardings = None
    if mesh is not None:
        shard.check(cfg, mesh, fsdp=fsdp)
        specs = ckpt_io.flat(shard.param_specs(ckpt_io.shape_tree(sources), fsdp=fsdp), lambda s: isinstance(s, P))
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    return gptj.nest(dict(ckpt_io.leaves(sources, dtype, shardings, progress))), cfg


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
            ckpt_peft.export(args.src, args.dst, force=args.force)
            print(f"wrote {args.dst}", file=sys.stderr)
            return 0
        cfg, sources = _open(args.src, args.config)
        items = ckpt_io.leaves(_check_params(args.src, cfg, sources), args.dtype, progress=True)
        if args.to == "native":
            items = ((f"params.{k}", x) for k, x in items)
            ckpt_native.save_items(args.dst, items, cfg, {"source": os.path.abspath(args.src)}, args.force)
        else:
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

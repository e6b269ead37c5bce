"""HuggingFace's GPT-J layout, in and out: config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin (read without torch where it can be). Torch Linear weights are [out, in]; ours are [in, out].
ckpt.py tells the formats apart and loads through `sources`."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

import ckpt_io
import data
import gptj

HF_NAMES = {  # our leaf -> HF tensor name; {i} is the layer of a stacked leaf
    "wte": "transformer.wte.weight",
    "h.ln_1.weight": "transformer.h.{i}.ln_1.weight", "h.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    "h.q_proj.weight": "transformer.h.{i}.attn.q_proj.weight",
    "h.k_proj.weight": "transformer.h.{i}.attn.k_proj.weight",
    "h.v_proj.weight": "transformer.h.{i}.attn.v_proj.weight",
    "h.out_proj.weight": "transformer.h.{i}.attn.out_proj.weight",
    "h.fc_in.weight": "transformer.h.{i}.mlp.fc_in.weight", "h.fc_in.bias": "transformer.h.{i}.mlp.fc_in.bias",
    "h.fc_out.weight": "transformer.h.{i}.mlp.fc_out.weight", "h.fc_out.bias": "transformer.h.{i}.mlp.fc_out.bias",
    "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias",
}
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _hf_names(leaf, cfg):
    """HF tensors holding our leaf (one per layer if stacked), and whether they are stored [out, in]."""
    names = [HF_NAMES[leaf].format(i=i) for i in range(cfg.n_layer)] if leaf.startswith("h.") else [HF_NAMES[leaf]]
    return names, leaf.endswith("weight") and "ln_" not in leaf


def _hf_config(path) -> gptj.Config:
    f = os.path.join(path, "config.json")
    c = ckpt_io.read_json(f)
    try:
        if c.get("model_type") != "gptj":
            raise ValueError(f"{path} is a {c.get('model_type')} model, not GPT-J")
        if c.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"{f}: activation {c['activation_function']} is not GPT-J's gelu_new")
        rotary = c.get("rotary_dim")  # null: rotary over whole heads
        cfg = ckpt_io.make_config(f, n_vocab=c["vocab_size"], n_ctx=c["n_positions"], d_model=c["n_embd"], n_layer=c["n_layer"],
                      n_head=c["n_head"], rotary_dim=0 if rotary is None else rotary, d_ff=c.get("n_inner") or 0,
                      layer_norm_eps=c.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise ValueError(f"{f} lacks {e}") from None
    return cfg if rotary is not None else dataclasses.replace(cfg, rotary_dim=cfg.d_head)


def safetensors_tensors(f) -> dict:
    safe_open = ckpt_io.require("safetensors").safe_open
    try:
        handle = safe_open(f, framework="numpy")
    except Exception as e:  # the Rust error type is not importable in a stable place
        raise ValueError(f"{f}: unreadable safetensors file ({e})") from None
    out = {}
    for name in handle.keys():
        sl = handle.get_slice(name)  # reads only the bytes a slice asks for
        out[name] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype()), sl.__getitem__)
    return out


def _torch_tensors(f) -> dict:
    torch = ckpt_io.require("torch")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{f}: unreadable PyTorch checkpoint ({e})") from None

    def reader(t):
        def read(idx):
            x = t[idx].contiguous()
            # numpy has no bfloat16: move the raw bits over and relabel them
            return x.view(torch.int16).numpy().view(jnp.bfloat16) if x.dtype == torch.bfloat16 else x.numpy()
        return read
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
    return {n: (tuple(t.shape), names.get(t.dtype), reader(t)) for n, t in state.items() if torch.is_tensor(t)}


def sources(path):
    cfg = _hf_config(path)
    index = [f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
             if os.path.isfile(os.path.join(path, f))]
    if index:
        weight_map = ckpt_io.read_json(os.path.join(path, index[0])).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{os.path.join(path, index[0])}: no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))][:1]
    if not files:
        raise ValueError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin")
    tensors = {}
    for f in files:
        full = os.path.join(path, f)
        tensors.update(safetensors_tensors(full) if f.endswith(".safetensors") else _torch_tensors(full))
    sources = {}
    for leaf, shape in gptj.param_shapes(cfg).items():
        names, transposed = _hf_names(leaf, cfg)
        want = shape[1:] if leaf.startswith("h.") else shape
        want = want[::-1] if transposed else want
        for n in names:
            if n not in tensors:
                raise ValueError(f"{path}: tensor {n} is missing")
            if tensors[n][0] != want or tensors[n][1] is None:
                raise ValueError(f"{path}: tensor {n} is {tensors[n][0]} {tensors[n][1]}, config implies {want} float")

        def read_layer(i, idx, names=names, transposed=transposed):  # i is None for unstacked leaves
            get = tensors[names[0 if i is None else i]][2]
            return ckpt_io.transpose(get(idx[::-1])) if transposed else get(idx)
        read = ckpt_io.stacked(cfg.n_layer, read_layer) if leaf.startswith("h.") else \
            (lambda idx, dt, r=read_layer: np.asarray(r(None, idx), dt))
        sources[leaf] = (shape, jnp.dtype(tensors[names[0]][1]), read)
    return cfg, sources


def _hf_json(cfg: gptj.Config, dtype: str) -> dict:
    eot = data.EOT if cfg.n_vocab > data.EOT else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return {"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": cfg.n_vocab,
            "n_positions": cfg.n_ctx, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "rotary_dim": cfg.rotary_dim, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.layer_norm_eps, "bos_token_id": eot, "eos_token_id": eot,
            "tie_word_embeddings": False, "dtype": dtype}


def save_items(dst, items, cfg: gptj.Config, dtype=None, max_shard_bytes=2 * 1024**3, force=False):
    """Write (our leaf, array) pairs as HF tensors, into safetensors files of at most max_shard_bytes
    (one bigger tensor gets a file of its own). Host memory: one leaf plus one file's tensors."""
    if cfg.rotary_dim == 0:
        raise ValueError("HuggingFace's GPT-J has no rotary_dim 0 (it reads 0 as no setting and fails): this "
                         "model cannot be exported to it; keep it native")
    shapes = gptj.param_shapes(cfg)
    with ckpt_io.atomic_dir(dst, force) as tmp:
        save_file = ckpt_io.require("safetensors.numpy").save_file
        files, pending, written, dtypes = [], {}, set(), set()

        def flush():
            save_file(pending, os.path.join(tmp, f"part-{len(files)}"), metadata={"format": "pt"})
            files.append(list(pending))
            pending.clear()
        for leaf, x in items:
            if leaf not in shapes:
                raise ValueError(f"{leaf} is not a GPT-J parameter")
            x = np.asarray(x, dtype)
            if x.shape != shapes[leaf]:
                raise ValueError(f"param {leaf} is {x.shape}, config implies {shapes[leaf]}")
            names, transposed = _hf_names(leaf, cfg)
            for i, name in enumerate(names):
                t = x[i] if leaf.startswith("h.") else x
                t = ckpt_io.transpose(t) if transposed else np.ascontiguousarray(t)
                if pending and sum(v.nbytes for v in pending.values()) + t.nbytes > max_shard_bytes:
                    flush()
                pending[name] = t
            written.add(leaf)
            dtypes.add(x.dtype.name)
            del x
        missing = set(shapes) - written
        if missing:
            raise ValueError(f"params lack {sorted(missing)[0]}")
        flush()
        if len(files) == 1:
            os.rename(os.path.join(tmp, "part-0"), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            for k, names in enumerate(files):
                name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(os.path.join(tmp, f"part-{k}"), os.path.join(tmp, name))
                weight_map.update(dict.fromkeys(names, name))
            total = sum(os.path.getsize(os.path.join(tmp, n)) for n in set(weight_map.values()))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            # Mixed dtypes (bf16 weights beside an fp32 fold) name the widest: transformers loading with
            # dtype="auto" casts every tensor to it, and float32 holds bfloat16 and float16 exactly.
            json.dump(_hf_json(cfg, dtypes.pop() if len(dtypes) == 1 else "float32"), f, indent=1)


def save(params, cfg: gptj.Config, dst, dtype=None, max_shard_bytes=2 * 1024**3, *, force=False):
    """Export params as a HuggingFace GPT-J folder (config.json + safetensors) for GPTJForCausalLM.from_pretrained."""
    items = ((name, np.asarray(x)) for name, x in ckpt_io.flat(params).items())
    save_items(dst, items, cfg, dtype, max_shard_bytes, force)



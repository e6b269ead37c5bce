"""LoRA adapters in HuggingFace PEFT's format: a folder of adapter_config.json and adapter_model.safetensors.

PEFT names GPT-J's adapter tensors after the module they adapt, `base_model.model.transformer.h.{i}.attn.q_proj.
lora_A.weight`, and stores them as torch Linear weights: lora_A [r, in], lora_B [out, r]; ours are A [in, r] and
B [r, out], stacked over layers. Read back: `train.py --init_from BASE --lora_from FOLDER` continues a fine-tune
started in PEFT or here; written: `python ckpt.py RUN DST --to peft` for `PeftModel.from_pretrained(base, DST)`.
"""
import json
import os

import numpy as np

import ckpt_hf
import ckpt_io
import ckpt_native
import gptj
import lora

# adapter_config.json keys read for what they say, or that change nothing that is computed once an adapter is
# trained (bookkeeping, dropout, initialisers that leave the base as it is). Any other key must hold its plain
# value (absent, null, false, empty, "none"): DoRA, rsLoRA, rank and alpha patterns, bias training, modules to save,
# layer selection or replication, activated LoRA, and initialisers that rewrite the base (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA) are not implemented here, and are refused rather than read as plain LoRA.
READ = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "lora_alpha", "target_modules", "lora_dropout", "megatron_core", "qalora_group_size",
        "layers_pattern", "init_lora_weights", "eva_config"}
PLAIN_INIT = (True, False, "gaussian", "eva")  # initialisers that leave the base weights as they are


def _module(target: str, layer: int) -> str:
    return "base_model.model." + ckpt_hf.HF_NAMES[f"h.{target}.weight"].format(i=layer)[:-len(".weight")]


def export(src, dst, force=False):
    """Write the newest checkpoint of LoRA run `src` (or that checkpoint itself) as a PEFT adapter folder."""
    path = ckpt_native.latest(src) if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "meta.json")) else src
    if path is None or not os.path.isfile(os.path.join(path, "meta.json")):
        raise ValueError(f"{src}: no native checkpoint (--to peft takes a LoRA training run)")
    meta, sources = ckpt_native.sources(path)
    if "lora" not in meta:
        raise ValueError(f"{src} is not a LoRA run: --to peft needs one trained with lora_rank > 0")
    info = ckpt_native.lora_meta(meta, path)
    cfg = ckpt_native.meta_config(meta, os.path.join(path, "meta.json"))
    tensors = {}
    for target in info["targets"]:
        missing = [x for x in "ab" if f"params.h.{target}.lora_{x}" not in sources]
        if missing:
            raise ValueError(f"{path}: no params.h.{target}.lora_{missing[0]}, which its meta.json names: damaged")
        a, b = (sources[f"params.h.{target}.lora_{x}"] for x in "ab")
        a, b = (read(ckpt_io.full(shape), np.float32) for shape, _, read in (a, b))
        for i in range(cfg.n_layer):
            tensors[_module(target, i) + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[_module(target, i) + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info["rank"], "lora_alpha": info["alpha"],
              "target_modules": sorted(info["targets"]), "lora_dropout": 0.0, "base_model_name_or_path": info["base"],
              "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "revision": None,
              "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
              "modules_to_save": None, "layers_to_transform": None, "fan_in_fan_out": False}
    save_file = ckpt_io.require("safetensors.numpy").save_file
    with ckpt_io.atomic_dir(dst, force) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)


def read_adapters(path, cfg: gptj.Config, rank: int, alpha: float, targets) -> dict:
    """Adapters {"h": {target: {"lora_a", "lora_b"}}} (float32 numpy) from a PEFT adapter folder, after checking
    that its settings are the run's and its shapes fit the base (PEFT adapters carry no fingerprint of theirs)."""
    f = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(f):
        raise ValueError(f"{path}: no adapter_config.json: not a PEFT adapter folder")
    conf = ckpt_io.read_json(f)
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{f}: peft_type {conf.get('peft_type')!r}: only LORA adapters are read")
    for key, value in conf.items():
        if key not in READ and value not in (None, False, {}, [], "none"):
            raise ValueError(f"{f}: {key}={value!r} is not supported: only plain LoRA adapters are read")
    if conf.get("init_lora_weights", True) not in PLAIN_INIT:
        raise ValueError(f"{f}: init_lora_weights={conf['init_lora_weights']!r} rewrites the base weights, which is "
                         f"not supported: convert the adapter to plain LoRA in PEFT first")
    modules = conf.get("target_modules")
    if not isinstance(modules, list):
        raise ValueError(f"{f}: target_modules {modules!r} must be a list of module names (a pattern is not read)")
    have = (conf.get("r"), conf.get("lora_alpha"), sorted(modules))
    want = (rank, alpha, sorted(targets))  # the order targets are named in does not matter
    if have != want:
        raise ValueError(f"{f}: r={have[0]}, lora_alpha={have[1]}, target_modules={','.join(have[2])}, but the run "
                         f"has lora_rank={rank}, lora_alpha={alpha}, lora_targets={','.join(want[2])}: "
                         f"set them to match")
    tensors_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(tensors_file):
        raise ValueError(f"{path}: no adapter_model.safetensors (adapter_model.bin is not read)")
    tensors = ckpt_hf.safetensors_tensors(tensors_file)
    shapes = lora.shapes(cfg, rank, targets)
    out, used = {}, set()
    for target in targets:
        for x, name in (("a", "lora_A"), ("b", "lora_B")):
            want_shape = shapes[f"h.{target}.lora_{x}"][1:][::-1]  # torch layout, per layer
            layers = []
            for i in range(cfg.n_layer):
                key = f"{_module(target, i)}.{name}.weight"
                if key not in tensors:
                    raise ValueError(f"{tensors_file} lacks {key}: the adapter does not fit this base")
                shape, _, read = tensors[key]
                if shape != want_shape:
                    raise ValueError(f"{tensors_file}: {key} is {list(shape)}, the base implies {list(want_shape)}: "
                                     f"the adapter does not fit this base")
                layers.append(np.asarray(read(ckpt_io.full(shape)), np.float32).T)
                used.add(key)
            out[f"h.{target}.lora_{x}"] = np.stack(layers)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{tensors_file} holds {extra[0]}, which adapts nothing in this base: not a GPT-J adapter")
    return gptj.nest(out)

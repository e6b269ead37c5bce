"""The training configuration: one frozen dataclass, `Run`, whose fields are the keys of a config file and the flags
of train.py. The original mesh-transformer-jax keys load as they are; `Run.model` translates them, once, to
gptj.Config's names.

    run = load_config("configs/6B_v3-8.json", {"lr": 1e-5})   # defaults <- the file <- flags
    cfg = run.model()                                          # the gptj.Config it trains
"""
import dataclasses
import os
import sys
import types

import jax

import ckpt
import data
import gptj

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shakespeare.json")


class ConfigError(ValueError):
    """A setting that cannot run: the programs print it as one `error:` line and exit 1."""


@dataclasses.dataclass(frozen=True)
class Run:
    """Every key of a training config, with its type and default (docs/training.md explains each)."""
    # The original mesh-transformer-jax keys.
    layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_vocab: int = 50304
    norm: str = "layernorm"
    pe: str = "rotary"
    pe_rotary_dims: int = 32
    seq: int = 128
    cores_per_replica: int = 1
    per_replica_batch: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 20
    anneal_steps: int = 540
    lr: float = 3e-3
    end_lr: float = 3e-4
    weight_decay: float = 0.1
    total_steps: int = 560
    val_every: int = 100
    val_batches: int = 10
    ckpt_every: int = 100
    keep_every: int = 0
    tpu_size: int = 0
    model_dir: str = "runs/shakespeare"
    train_set: str = "shakespeare:train"
    val_set: str | dict = "shakespeare:val"  # a spec, or {name: spec}
    name: str = "shakespeare"
    wandb_project: str = ""
    # New keys.
    n_ctx: int = 0
    d_ff: int = 0
    dtype: str = "auto"
    remat: bool = False
    z_loss: float = 1e-4
    seed: int = 0
    log_every: int = 10
    keep_last: int = 3
    init_from: str = ""
    sample_tokens: int = 100
    grad_acc_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    lora_from: str = ""
    fsdp: bool = False
    sequence_parallel: bool = False

    def model(self, platform: str | None = None) -> gptj.Config:
        """The gptj.Config this run trains on `platform` (default: JAX's default backend's)."""
        if self.norm != "layernorm" or self.pe != "rotary":
            raise ConfigError(f"norm={self.norm!r}, pe={self.pe!r}: GPT-J uses norm 'layernorm' and pe 'rotary'")
        dtype = self.dtype
        if dtype == "auto":  # bf16 compute where the matrix units want it, fp32 on CPUs
            dtype = "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
        n_ctx = self.n_ctx or self.seq
        if self.seq > n_ctx:
            raise ConfigError(f"seq={self.seq} is above the model's context n_ctx={n_ctx}: lower seq")
        sizes = {field: getattr(self, key) for key, field in SIZES.items()} | {"n_ctx": n_ctx}
        try:
            return gptj.Config(**sizes, dtype=dtype, remat=self.remat)
        except ValueError as e:
            raise ConfigError(str(e)) from None


# The key table, derived from the fields: each key's default and type.
KEYS = {f.name: f.default for f in dataclasses.fields(Run)}
TYPES = {f.name: f.type for f in dataclasses.fields(Run)}
# The model's sizes: Run's keys (the original's names) and the gptj.Config fields they set.
SIZES = {"layers": "n_layer", "d_model": "d_model", "n_heads": "n_head", "n_vocab": "n_vocab",
         "pe_rotary_dims": "rotary_dim", "d_ff": "d_ff", "n_ctx": "n_ctx"}
# Original keys that only made sense on Google Cloud, or are derived; accepted and reported as ignored.
IGNORED = {"bucket", "eval_harness_tasks", "comment", "tokens_per_step"}
# Ranges and choices that the types alone do not enforce.
AT_LEAST_1 = ("layers", "d_model", "n_heads", "n_vocab", "seq", "cores_per_replica", "per_replica_batch",
              "gradient_accumulation_steps", "log_every", "keep_last")
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "grad_acc_dtype": ("float32", "bfloat16")}


def scalar_type(key: str) -> type:
    """The type a key's flag is parsed as: its field's type, or a union's first (val_set's str)."""
    kind = TYPES[key]
    return kind.__args__[0] if isinstance(kind, types.UnionType) else kind


def _typed(key, value, where):
    """A config file's value, checked against the key's type (an int is a float too)."""
    if isinstance(value, dict) and isinstance(TYPES[key], types.UnionType) and dict in TYPES[key].__args__:
        if not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: {key} {value!r} must map names to data specs (strings)")
        return value
    want = scalar_type(key)
    if want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {want.__name__}, got {value!r}")
    return value


def parse_flag(key: str, text: str):
    """A command-line value, parsed as the key's type."""
    want = scalar_type(key)
    try:
        if want is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return want(text)
    except ValueError:
        raise ConfigError(f"--{key} {text!r}: expected {want.__name__}") from None


def add_flags(parser):
    """A `--key VALUE` flag for every key; `flags` reads them back."""
    for key, default in KEYS.items():
        parser.add_argument(f"--{key}", metavar=scalar_type(key).__name__.upper(), help=f"(default {default!r})")


def flags(args) -> dict:
    """The keys set on the command line, typed: load_config's overrides."""
    return {k: parse_flag(k, v) for k, v in vars(args).items() if k in KEYS and v is not None}


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

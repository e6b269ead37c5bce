"""Tests for ckpt.py: native save/load, HuggingFace and original-checkpoint readers, export, bad input."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt
import ckpt_hf
import gptj
import shard

# n_head, d_ff and n_vocab divisible by 8 so the original layout's 8 shards split evenly; rotary_dim < d_head
# so the pass-through dims are covered too.
CFG = gptj.Config(n_vocab=96, n_ctx=32, d_model=64, n_layer=2, n_head=8, rotary_dim=4)
ORIG_CFG = dataclasses.replace(CFG, n_layer=12)  # >10 layers: layer_10 sorts before layer_2
ORIG_JSON = {"layers": 12, "d_model": 64, "n_heads": 8, "n_vocab": 96, "norm": "layernorm", "pe": "rotary",
             "pe_rotary_dims": 4, "seq": 32, "cores_per_replica": 8, "per_replica_batch": 1}
BF16 = ml_dtypes.bfloat16
# safetensors, torch and transformers are dev extras (requirements-dev.txt): skipped without them, except under
# CI=true, where conftest.py makes such a skip a failure.
def _installed(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


needs_safetensors = pytest.mark.skipif(not _installed("safetensors"), reason="needs safetensors")


def random_params(cfg, seed=0):
    """fp32 numpy params, every leaf random: LayerNorms and biases too (init_params leaves them 1/0, which
    would hide a swapped or dropped one). Weights [..., in, out] get std 1/sqrt(in) to keep activations O(1)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name, noise = jax.tree_util.keystr(path), rng.standard_normal(x.shape).astype(np.float32)
        if "ln" in name or "bias" in name:
            return 0.2 * noise + ("ln" in name and "weight" in name)
        return noise * x.shape[-2] ** -0.5
    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(lambda: gptj.init_params(cfg, jax.random.key(0))))


def assert_same(a, b):
    """Identical trees: same structure, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.astype(np.float64), y.astype(np.float64))


def cast(tree, dtype):
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


# ---------------------------------------------------------------- native format

def train_state(params):
    tx = optax.adam(1e-3)
    # one jitted update (eager optax runs slowly op by op): non-zero moments and count
    _, opt_state = jax.jit(tx.update)(params, tx.init(params), params)
    return {"params": params, "opt_state": opt_state}


def test_native_round_trip_with_optimizer_state(tmp_path):
    params = random_params(CFG)
    tree = train_state(params)
    ckpt.save(tmp_path / "c", tree, CFG, {"step": 7, "data": {"position": 123}})
    assert_same(ckpt.load(tmp_path / "c", like=jax.eval_shape(lambda: tree)), tree)
    assert_same(ckpt.load(tmp_path / "c"), params)
    meta = ckpt.read_meta(tmp_path / "c")
    assert meta["step"] == 7 and meta["data"] == {"position": 123} and meta["config"] == dataclasses.asdict(CFG)
    assert meta["leaves"]["params.h.q_proj.weight"] == {"shape": [2, 64, 64], "dtype": "float32"}
    assert "opt_state.0.mu.h.fc_in.weight" in meta["leaves"]
    loaded, cfg = ckpt.load_weights(tmp_path / "c", dtype="bfloat16")
    assert cfg == CFG
    assert_same(loaded, cast(params, BF16))


def test_native_bf16_onto_mesh(tmp_path):
    params = cast(random_params(CFG), BF16)
    tree = train_state(params)
    ckpt.save(tmp_path / "c", tree, CFG)
    mesh = shard.make_mesh(2, 4)
    pspecs = shard.param_specs(params)
    specs = {"params": pspecs, "opt_state": jax.tree.map(lambda x: shard.zero_spec(P(), x.shape, 2), tree["opt_state"])}
    back = ckpt.load(tmp_path / "c", like=jax.eval_shape(lambda: tree), mesh=mesh, specs=specs)
    assert_same(back, tree)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    for x, spec in zip(jax.tree.leaves(back), flat_specs):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
    loaded, _ = ckpt.load_weights(tmp_path / "c", mesh=mesh)
    assert loaded["h"]["fc_in"]["weight"].sharding.spec == pspecs["h"]["fc_in"]["weight"]
    assert_same(loaded, params)


def test_truncated_leaf_file(tmp_path):
    ckpt.save(tmp_path / "c", {"params": random_params(CFG)}, CFG)
    f = tmp_path / "c" / "params.h.fc_in.weight.bin"
    os.truncate(f, os.path.getsize(f) - 1)
    with pytest.raises(ValueError, match="params.h.fc_in.weight.bin.*truncated"):
        ckpt.load(tmp_path / "c")


def small_tree(step):
    return {"params": {"w": np.full((2, 3), step, np.float32)}}


def test_latest_falls_back_and_ignores_temp_dirs(tmp_path, capsys):
    for step in (1, 2, 3):
        ckpt.save(tmp_path / f"step_{step:08d}", small_tree(step), CFG)
    os.truncate(tmp_path / "step_00000003" / "params.w.bin", 4)  # damaged newest
    os.remove(tmp_path / "step_00000002" / "meta.json")  # and a partial one
    (tmp_path / "step_00000009.tmp-1234").mkdir()  # an interrupted write
    assert ckpt.latest(tmp_path) == str(tmp_path / "step_00000001")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_00000003" in err and "using" in err
    np.testing.assert_array_equal(ckpt.load(ckpt.latest(tmp_path))["w"], np.full((2, 3), 1))
    assert ckpt.latest(tmp_path / "nothing-here") is None


def test_prune(tmp_path):
    for step in range(1, 11):
        ckpt.save(tmp_path / f"step_{step:08d}", small_tree(step), CFG)
    (tmp_path / "step_00000011.tmp-99").mkdir()
    ckpt.prune(tmp_path, keep_last=2, keep_every=4)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000008", "step_00000009", "step_00000010",
                                             "step_00000011.tmp-99"]
    ckpt.prune(tmp_path, keep_last=1, keep_every=0)
    assert sorted(os.listdir(tmp_path)) == ["step_00000010", "step_00000011.tmp-99"]
    ckpt.prune(tmp_path, keep_last=0, keep_every=0)  # the newest complete one is never pruned
    assert sorted(os.listdir(tmp_path)) == ["step_00000010", "step_00000011.tmp-99"]


def test_save_is_atomic(tmp_path):
    class Boom:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("device lost")
    with pytest.raises(RuntimeError):
        ckpt.save(tmp_path / "c", {"params": {"a": np.ones(3), "b": Boom()}}, CFG)
    assert os.listdir(tmp_path) == []
    ckpt.save(tmp_path / "c", small_tree(1), CFG)
    with pytest.raises(ValueError, match="exists"):
        ckpt.save(tmp_path / "c", small_tree(2), CFG)
    ckpt.save(tmp_path / "c", small_tree(3), CFG, force=True)
    assert os.listdir(tmp_path) == ["c"]
    np.testing.assert_array_equal(ckpt.load(tmp_path / "c")["w"], np.full((2, 3), 3))


# ---------------------------------------------------------------- HuggingFace format

@needs_safetensors
def test_native_hf_native_exact(tmp_path):
    params = random_params(CFG)
    ckpt.save(tmp_path / "run" / "step_00000005", {"params": params}, CFG)
    assert ckpt.main([str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "gptj" and hf_config["rotary_dim"] == 4 and not hf_config["tie_word_embeddings"]
    assert ckpt.main([str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "native"]) == 0
    loaded, cfg = ckpt.load_weights(tmp_path / "native")
    assert cfg == CFG
    assert_same(loaded, params)


@needs_safetensors
@pytest.mark.parametrize("variant", ["safetensors", "sharded", "bin"])
def test_hf_reader(tmp_path, variant):
    params = random_params(CFG)
    dtype = BF16 if variant == "bin" else np.float32
    ckpt_hf.save(params, CFG, tmp_path, dtype=dtype, max_shard_bytes=40_000 if variant == "sharded" else 2**31,
                 force=True)
    if variant == "sharded":
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
        assert (tmp_path / "model.safetensors.index.json").exists()
    if variant == "bin":
        torch = pytest.importorskip("torch")
        from safetensors.torch import load_file
        state = load_file(tmp_path / "model.safetensors")
        state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool)  # buffers to ignore
        state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
        torch.save(state, tmp_path / "pytorch_model.bin")
        os.remove(tmp_path / "model.safetensors")
    mesh = shard.make_mesh(2, 4) if variant == "sharded" else None
    loaded, cfg = ckpt.load_weights(tmp_path, mesh=mesh)
    assert cfg == CFG
    assert_same(loaded, cast(params, dtype))


def greedy(logits_fn, prompt, steps):
    """Greedy continuation, recomputing a fixed-size buffer (one compiled shape) each step."""
    tokens = np.zeros((prompt.shape[0], prompt.shape[1] + steps), np.int32)
    tokens[:, :prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], tokens.shape[1]):
        tokens[:, t] = np.asarray(logits_fn(tokens))[:, t - 1].argmax(-1)
    return tokens


@needs_safetensors
def test_agrees_with_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = random_params(CFG, seed=1)
    ckpt_hf.save(params, CFG, tmp_path / "hf", max_shard_bytes=200_000)  # sharded, as the 6B export is
    model = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                         dtype=torch.float32).eval()
    forward = jax.jit(lambda p, t: gptj.forward(p, t, CFG)[0])
    ours_fn = lambda t: forward(params, t)
    tokens = np.random.default_rng(0).integers(0, CFG.n_vocab, (2, 16)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
        ours = np.asarray(ours_fn(tokens))
        diff = np.abs(ours - theirs).max()
        print(f"max |logits diff| vs transformers: {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")
        assert diff <= 1e-5
        prompt = tokens[:, :6]
        theirs_fn = lambda t: model(torch.from_numpy(t).long()).logits.numpy()
        np.testing.assert_array_equal(greedy(ours_fn, prompt, 10), greedy(theirs_fn, prompt, 10))


# ---------------------------------------------------------------- original mesh-transformer-jax layout

def write_original(folder, params, cfg, full=False, shards=8, seed=0):
    """Write params as mesh-transformer-jax did, independently of ckpt.py's reader, and return what a correct
    reader must assemble: bf16 stored as V2 ("slim") or fp32 after optimizer state ("full"), per-shard
    partial biases, LayerNorm copies that differ on shards 1..7."""
    rng = np.random.default_rng(seed)
    store = np.float32 if full else BF16
    rounded = lambda a: np.asarray(a, np.float32).astype(store)
    haiku = [{} for _ in range(shards)]  # per shard {module path: {name: array}}

    def put(module, name, pieces):
        for s in range(shards):
            haiku[s].setdefault("causal_transformer_shard/~/" + module, {})[name] = rounded(pieces[s])

    def split(a, axis):
        return np.split(np.asarray(a), shards, axis=axis)

    def partial_sums(size):  # per-shard partial biases and their true sum, summed in fp32 in shard order
        pieces = [rounded(0.1 * rng.standard_normal(size)) for _ in range(shards)]
        total = np.zeros(size, np.float32)
        for p in pieces:
            total += p.astype(np.float32)
        return pieces, total

    def layer_norm(module, ln):
        put(module, "offset", [ln["bias"] + (s > 0) for s in range(shards)])
        put(module, "scale", [ln["weight"] * (1 + (s > 0)) for s in range(shards)])

    expected = cast(params, store)
    # Leaves computed from several stored ones keep the float32 of the computation: the embedding with its
    # folded bias, and the summed partial biases.
    expected["h"]["fc_out"]["bias"] = np.zeros((cfg.n_layer, cfg.d_model), np.float32)
    emb_bias, emb_total = partial_sums(cfg.d_model)
    put("embedding_shard/~/linear", "w", split(params["wte"], 0))
    put("embedding_shard/~/linear", "b", emb_bias)
    expected["wte"] = rounded(params["wte"]).astype(np.float32) + emb_total
    for i in range(cfg.n_layer):
        h = jax.tree.map(lambda x: x[i], params["h"])
        m = f"layer_{i}/~/"
        put(m + "linear", "w", split(h["q_proj"]["weight"], 1))
        put(m + "linear_1", "w", split(h["v_proj"]["weight"], 1))
        put(m + "linear_2", "w", split(h["k_proj"]["weight"], 1))
        put(m + "linear_3", "w", split(h["out_proj"]["weight"], 0))
        put(m + "linear_4", "w", split(h["fc_in"]["weight"], 1))
        put(m + "linear_4", "b", split(h["fc_in"]["bias"], 0))
        put(m + "linear_5", "w", split(h["fc_out"]["weight"], 0))
        fc_out_bias, expected["h"]["fc_out"]["bias"][i] = partial_sums(cfg.d_model)
        put(m + "linear_5", "b", fc_out_bias)
        layer_norm(m + "replicated_layer_norm", h["ln_1"])
    put("projection_shard/~/linear", "w", split(params["lm_head"]["weight"], 1))
    put("projection_shard/~/linear", "b", split(params["lm_head"]["bias"], 0))
    layer_norm("projection_shard/~/replicated_layer_norm", params["ln_f"])

    for s in range(shards):
        as_stored = jax.tree.map(lambda a: a if full else a.view("V2"), haiku[s])  # numpy has no bfloat16
        state = {"params": as_stored, "step": np.array(383500, np.int32)}
        if full:
            moments = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), haiku[s])
            state["opt_state"] = ({"count": np.array(17, np.int32)}, {"mu": moments, "nu": moments})
        leaves = jax.tree.leaves(state)  # jax sorts dict keys: opt_state, params, step; modules by path
        k, m = divmod(len(leaves), 16)
        os.makedirs(folder / f"shard_{s}")
        for i in range(16):
            start = i * k + min(i, m)
            np.savez(folder / f"shard_{s}" / f"{i}.npz", *leaves[start:start + k + (i < m)])
    return expected


@pytest.mark.parametrize("variant,mesh_shape", [("slim", None), ("slim", (2, 4)), ("full", (1, 8))])
def test_original_reader(tmp_path, variant, mesh_shape):
    params = random_params(ORIG_CFG, seed=2)
    expected = write_original(tmp_path / "ckpt", params, ORIG_CFG, full=variant == "full")
    if variant == "slim":
        assert np.load(tmp_path / "ckpt" / "shard_3" / "5.npz")["arr_0"].dtype == np.dtype("V2")
    (tmp_path / "gptj.json").write_text(json.dumps(ORIG_JSON))
    mesh = None if mesh_shape is None else shard.make_mesh(*mesh_shape)
    loaded, cfg = ckpt.load_weights(tmp_path / "ckpt", config=str(tmp_path / "gptj.json"), mesh=mesh)
    assert cfg == ORIG_CFG
    assert_same(loaded, expected)


@needs_safetensors
def test_original_to_native_to_hf_keeps_the_exact_fold(tmp_path):
    """The slim bf16 checkpoint converted with no --dtype: the folded embedding and summed biases stay the
    exact float32 sums through native and HF, and transformers loading with dtype="auto" keeps them so."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    expected = write_original(tmp_path / "orig", random_params(ORIG_CFG, seed=3), ORIG_CFG)
    assert expected["wte"].dtype == np.float32 and not np.array_equal(expected["wte"], cast(expected["wte"], BF16))
    config = config_file(tmp_path)
    assert ckpt.main([str(tmp_path / "orig"), str(tmp_path / "native"), "--to", "native", "--config", config]) == 0
    leaves = ckpt.read_meta(tmp_path / "native")["leaves"]
    assert leaves["params.wte"]["dtype"] == "float32" and leaves["params.h.fc_out.bias"]["dtype"] == "float32"
    assert leaves["params.h.q_proj.weight"]["dtype"] == "bfloat16"  # copied as stored
    assert ckpt.main([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"  # the widest held
    model = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto")
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(state["transformer.wte.weight"], expected["wte"])
    for i in range(ORIG_CFG.n_layer):
        np.testing.assert_array_equal(state[f"transformer.h.{i}.mlp.fc_out.bias"], expected["h"]["fc_out"]["bias"][i])
    np.testing.assert_array_equal(state["transformer.h.0.attn.q_proj.weight"],
                                  expected["h"]["q_proj"]["weight"][0].astype(np.float32).T)


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orig")
    write_original(folder / "ckpt", random_params(ORIG_CFG), ORIG_CFG)
    return folder / "ckpt"


def config_file(tmp_path, **changes):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**ORIG_JSON, **changes}))
    return str(f)


def test_original_config_missing_or_wrong(tmp_path, original):
    with pytest.raises(ValueError, match="--config"):
        ckpt.load_weights(original)
    with pytest.raises(ValueError, match="lacks 'layers'"):
        ckpt.load_weights(original, config={k: v for k, v in ORIG_JSON.items() if k != "layers"})
    first_leaf = r"leaf causal_transformer_shard/~/embedding_shard/~/linear/b .*\(64,\).*\(32,\)"
    with pytest.raises(ValueError, match=first_leaf):
        ckpt.load_weights(original, config=config_file(tmp_path, d_model=32))
    with pytest.raises(ValueError, match="leaf .* has shape"):
        ckpt.load_weights(original, config=config_file(tmp_path, layers=11))
    with pytest.raises(ValueError, match="does not fit 13 layers"):
        ckpt.load_weights(original, config=config_file(tmp_path, layers=13))
    with pytest.raises(ValueError, match="cores_per_replica=4"):
        ckpt.load_weights(original, config=config_file(tmp_path, cores_per_replica=4))


def test_truncated_npz(tmp_path, original):
    import shutil
    shutil.copytree(original, tmp_path / "orig")
    f = tmp_path / "orig" / "shard_5" / "7.npz"
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ValueError, match="shard_5/7.npz"):
        ckpt.load_weights(tmp_path / "orig", config=ORIG_JSON)


@needs_safetensors
def test_truncated_safetensors(tmp_path):
    ckpt_hf.save(random_params(CFG), CFG, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        ckpt.load_weights(tmp_path / "hf")


def test_not_gptj(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="is a gpt2 model, not GPT-J"):
        ckpt.load_weights(tmp_path)


def test_cli_bad_input_writes_nothing(tmp_path, original, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    cases = [
        ([str(tmp_path / "junk")], "not a GPT-J checkpoint"),
        ([str(original)], "--config"),
        ([str(original), "--config", config_file(tmp_path, d_model=32)], "wrong --config"),
    ]
    for args, message in cases:
        assert ckpt.main(args[:1] + [str(tmp_path / "out"), "--to", "hf"] + args[1:]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()
    # An existing DST is left alone without --force, and replaced with it.
    (tmp_path / "out").mkdir()
    assert ckpt.main([str(original), str(tmp_path / "out"), "--to", "hf", "--config", config_file(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err and os.listdir(tmp_path / "out") == []
    assert ckpt.main([str(original), str(tmp_path / "out"), "--to", "native", "--config", config_file(tmp_path),
                      "--dtype", "float32", "--force"]) == 0
    assert ckpt.read_meta(tmp_path / "out")["leaves"]["params.wte"]["dtype"] == "float32"
    # The real exit status, from a separate process.
    run = subprocess.run([sys.executable, "ckpt.py", str(tmp_path / "junk"), str(tmp_path / "x"), "--to", "native"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(ckpt.__file__)))
    assert run.returncode == 1 and run.stderr.startswith("error: ") and not (tmp_path / "x").exists()


@needs_safetensors
def test_damaged_metadata_and_unexportable_models(tmp_path, capsys):
    """Hand-edited or damaged metadata is a one-line error naming the file; nothing is written."""
    params = random_params(CFG)
    ckpt.save(tmp_path / "nat", {"params": params}, CFG)
    ckpt_hf.save(params, CFG, tmp_path / "hf")

    def edit(src, name, change):
        import shutil
        dst = tmp_path / f"bad-{len(os.listdir(tmp_path))}"
        shutil.copytree(tmp_path / src, dst)
        meta = json.loads((dst / name).read_text())
        change(meta)
        (dst / name).write_text(json.dumps(meta))
        return dst

    cases = [
        (edit("nat", "meta.json", lambda m: m.pop("config")), "meta.json: no 'config' object"),
        (edit("nat", "meta.json", lambda m: m["config"].update(n_layer="2")), "meta.json: n_layer is '2', not an int"),
        (edit("nat", "meta.json", lambda m: m["leaves"]["params.wte"].update(shape="abc")), "'abc' is not a list"),
        (edit("hf", "config.json", lambda m: m.update(n_layer=None)), "config.json: n_layer is None, not an int"),
        (edit("hf", "config.json", lambda m: m.update(layer_norm_epsilon="small")), "layer_norm_eps is 'small'"),
    ]
    for src, message in cases:
        assert ckpt.main([str(src), str(tmp_path / "out"), "--to", "hf"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    no_rotary = dataclasses.replace(CFG, rotary_dim=0)
    ckpt.save(tmp_path / "r0", {"params": params}, no_rotary)
    assert ckpt.main([str(tmp_path / "r0"), str(tmp_path / "out"), "--to", "hf"]) == 1
    assert "rotary_dim 0" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # --force over a file replaces it without leaving the old one beside it; files get the umask's mode.
    (tmp_path / "file").write_text("hi")
    assert ckpt.main([str(tmp_path / "nat"), str(tmp_path / "file"), "--to", "hf", "--force"]) == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith("file.")]
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(os.stat(f).st_mode & 0o777) for f in (tmp_path / "file").iterdir()} == {oct(0o666 & ~umask)}


# ---------------------------------------------------------------- opt-in: the real GPT-J-6B

GPTJ_6B_GREEDY = [464, 3290, 318, 257, 582, 338, 1266, 1545, 13, 632, 318, 257, 9112, 15185, 11, 290, 340, 318,
                  257, 1545]


@pytest.mark.skipif(not os.environ.get("GPTJ_6B_PATH"),
                    reason="needs GPTJ_6B_PATH: GPT-J-6B weights (HF folder, or original folder + GPTJ_6B_CONFIG)")
def test_gptj_6b_greedy():
    dtype = os.environ.get("GPTJ_6B_DTYPE", "bfloat16")
    params, cfg = ckpt.load_weights(os.environ["GPTJ_6B_PATH"], config=os.environ.get("GPTJ_6B_CONFIG"),
                                    mesh=shard.make_mesh(1, 1), dtype=dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    step = jax.jit(lambda p, t, c: gptj.forward(p, t, cfg, cache=c))
    tokens = GPTJ_6B_GREEDY[:2]
    logits, cache = step(params, jnp.asarray([tokens]), gptj.init_cache(cfg, 1, 32))
    while len(tokens) < len(GPTJ_6B_GREEDY):
        tokens.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = step(params, jnp.asarray([tokens[-1:]]), cache)
    assert tokens == GPTJ_6B_GREEDY

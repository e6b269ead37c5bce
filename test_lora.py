"""LoRA: adapters beside frozen weights, sharded as the weight they adapt, PEFT's format in and out."""
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import ckpt
import ckpt_io
import ckpt_native
import ckpt_peft
import config
import data
import gptj
import lora
import perf
import plan
import sample
import shard
import train
from conftest import TINY, assert_trees_close, assert_updates_close, plain_step

jax.config.update("jax_default_matmul_precision", "highest")

CFG = config.Run(**{**config.KEYS, **TINY}).model()
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,fc_out", sample_tokens=0)


def random_params(cfg, seed):
    """Every base leaf random (LayerNorms and biases too), weights with std 1/sqrt(in): from the shapes table, so
    that a property example draws a base in microseconds."""
    rng = np.random.default_rng(seed)
    leaves = {name: (rng.standard_normal(shape) / math.sqrt(shape[-2] if len(shape) > 1 else 5)).astype(np.float32)
              for name, shape in gptj.param_shapes(cfg).items()}
    return gptj.nest(leaves)


def random_adapters(cfg, rank, targets, seed):
    """Adapters with B non-zero too, so that the branch shows in every output."""
    rng = np.random.default_rng(seed)
    return gptj.nest({name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
                      for name, shape in lora.shapes(cfg, rank, targets).items()})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    params = random_params(CFG, 0)
    ckpt.save(folder / "native", {"params": params}, CFG)
    return folder / "native", params


def make_run(tmp_path, corpus, base_path, **kw):
    values = {**config.KEYS, **TINY, **LORA, "model_dir": str(tmp_path / "run"), "init_from": str(base_path),
              "train_set": str(corpus / "train.tokens"), "val_set": str(corpus / "val.tokens"), **kw}
    return config.Run(**values)


def adapters_of(model_dir):
    path = ckpt.latest(model_dir)
    meta, sources = ckpt_native.sources(path)
    return meta, {k: read(ckpt_io.full(shape), np.float32) for k, (shape, _, read) in sources.items()}


def test_step_zero_is_the_base_and_training_moves_only_the_adapters(tmp_path, corpus, base, capsys):
    base_path, base_params = base
    run = make_run(tmp_path, corpus, base_path, total_steps=6, lr=1e-2, warmup_steps=0, val_every=0,
                   sample_tokens=8)  # the final sample runs through the adapters beside the frozen base
    t = train.Trainer(run, jax.devices()[:1])
    state = t.init_state(jax.random.PRNGKey(0))
    assert not any(np.any(b) for b in jax.tree.leaves({k: v["lora_b"] for k, v in state["params"]["h"].items()}))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (2, 16)), jnp.int32)
    adapted = lora.combine(jax.tree.map(jnp.asarray, base_params), state["params"])
    scale = run.lora_alpha / run.lora_rank
    np.testing.assert_array_equal(gptj.forward(adapted, tokens, CFG, linear=lora.linear_fn(scale))[0],
                                  gptj.forward(base_params, tokens, CFG)[0])  # B = 0: the base model exactly

    train.train(run, jax.devices()[:1])
    assert "sample:" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run.model_dir, "metrics.jsonl"))]
    assert losses[-1] < losses[0] - 0.1, losses
    meta, saved = adapters_of(run.model_dir)
    # Only the adapters and their optimizer state are saved, with the base's path and fingerprint.
    assert sorted(k for k in saved if k.startswith("params.")) == sorted(
        f"params.h.{t}.lora_{x}" for t in ("q_proj", "v_proj", "fc_out") for x in "ab")
    assert meta["lora"]["base_fingerprint"] == ckpt.fingerprint(base_path)
    assert any(np.any(v) for k, v in saved.items() if k.endswith("lora_b"))
    # Read as weights, the run is its base with the adapters merged; the untargeted weights are the base's bits.
    merged, cfg = ckpt.load_weights(run.model_dir)
    assert cfg == CFG
    for name, x in ckpt_io.flat(base_params).items():
        got = np.asarray(ckpt_io.flat(merged)[name])
        if name in ("h.q_proj.weight", "h.v_proj.weight", "h.fc_out.weight"):
            t_ = name.split(".")[1]
            delta = np.einsum("lir,lro->lio", saved[f"params.h.{t_}.lora_a"], saved[f"params.h.{t_}.lora_b"])
            np.testing.assert_allclose(got, x + scale * delta, rtol=1e-6, atol=1e-6)
            assert not np.array_equal(got, x)
        else:
            np.testing.assert_array_equal(got, x)
    # sample.py serves the run as merged weights.
    args = sample.parse_args(["--checkpoint", run.model_dir, "--prompt", "x"])
    params, cfg, _ = sample.load(args)
    np.testing.assert_array_equal(params["h"][0]["q_proj"]["weight"], np.asarray(merged["h"]["q_proj"]["weight"][0]))


def test_resume_is_bit_identical(tmp_path, corpus, base):
    base_path, _ = base
    whole = make_run(tmp_path / "a", corpus, base_path, total_steps=4)
    train.train(whole, jax.devices()[:1])
    cut = make_run(tmp_path / "b", corpus, base_path, total_steps=2)
    train.train(cut, jax.devices()[:1])
    train.train(dataclasses.replace(cut, total_steps=4), jax.devices()[:1])
    (_, a), (_, b) = adapters_of(whole.model_dir), adapters_of(cut.model_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# warmup_steps 0: both steps update at a non-zero learning rate, the second from adapters the first one produced.
LORA_RUN = config.Run(**{**config.KEYS, **TINY, **LORA, "n_vocab": 64, "gradient_accumulation_steps": 2,
                         "lora_targets": ",".join(lora.TARGETS), "warmup_steps": 0})


@functools.cache
def lora_programs(dp, mp):
    """The sharded Trainer for a mesh and the plain step, each compiled once for every example."""
    run = dataclasses.replace(LORA_RUN, cores_per_replica=mp, per_replica_batch=8 // dp)
    return run, train.Trainer(run, jax.devices()[: dp * mp]), plain_step(LORA_RUN)


@pytest.mark.parametrize("dp, mp", [(2, 2), (1, 4), (2, 4)])
@given(seed=st.integers(0, 2**32 - 1))
def test_sharded_lora_step_equals_unsharded(dp, mp, seed):
    """Two LoRA steps over every kind of projection, adapters split as the weights they adapt (A for inputs
    split over mp, B for outputs), equal plain single-device steps, each plain step from the state the sharded
    steps reached (so the second runs on adapters a sharded update produced): the loss, the gradient norm, Adam's
    two moments to 2e-5 of each leaf's own scale, and the adapters' updates as assert_updates_close says."""
    run, t, step = lora_programs(dp, mp)
    assert t.shardings["params"]["h"]["out_proj"]["lora_a"].spec == shard.P(None, shard.MP, None)
    assert t.shardings["params"]["h"]["q_proj"]["lora_b"].spec == shard.P(None, None, shard.MP)
    frozen = random_params(t.cfg, seed)
    state = t.init_state(None, random_adapters(t.cfg, run.lora_rank, t.targets, seed + 1))
    rng = np.random.default_rng(seed)
    sharded = jax.device_put(state, t.shardings)
    placed = jax.device_put(frozen, t.frozen_shardings)
    for _ in range(2):
        b = rng.integers(0, 64, (2, 8, run.seq + 1)).astype(np.int32)
        start = jax.device_get(sharded)  # a host copy: the sharded step donates its state
        want_state, want = step(start, b, frozen)
        sharded, got = t.step(sharded, jax.device_put(b, t.batch_sharding), placed, t.halt(0))
        assert float(want["lr"]) > 0
        assert all(math.isclose(float(got[k]), float(want[k]), rel_tol=1e-5) for k in want)
        assert_trees_close(sharded["opt_state"], want_state["opt_state"], rtol=2e-5)
        assert_updates_close(start, sharded, want_state, float(want["lr"]))
    for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(x, y)  # the base is frozen: bit-unchanged by the steps


def test_peft_export_loads_in_peft_and_round_trips(tmp_path, corpus, base):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_path, base_params = base
    run = make_run(tmp_path, corpus, base_path, total_steps=2, lr=1e-2, warmup_steps=0)
    train.train(run, jax.devices()[:1])
    assert ckpt.main([str(base_path), str(tmp_path / "hf_base"), "--to", "hf"]) == 0
    assert ckpt.main([run.model_dir, str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert ckpt.main([run.model_dir, str(tmp_path / "hf_merged"), "--to", "hf"]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"]) == (4, 8.0, ["fc_out", "q_proj", "v_proj"])

    tokens = np.random.default_rng(1).integers(0, 50257, (2, 12))
    merged, _ = ckpt.load_weights(run.model_dir)
    ours = np.asarray(gptj.forward(merged, jnp.asarray(tokens, jnp.int32), CFG)[0])
    model = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf_base"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
    merged_hf = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf_merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        for theirs in (model(torch.from_numpy(tokens)).logits.numpy(),
                       merged_hf(torch.from_numpy(tokens)).logits.numpy()):
            assert np.abs(theirs - ours).max() <= 1e-5 * max(np.abs(ours).max(), 1)

    # PEFT in, ours out: an adapter PEFT itself made and saved comes back bit for bit.
    made = peft.get_peft_model(transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf_base")),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_out"]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_()
    made.save_pretrained(str(tmp_path / "theirs"))
    adapters = ckpt_peft.read_adapters(tmp_path / "theirs", CFG, 4, 8.0, ("q_proj", "v_proj", "fc_out"))
    meta = {"step": 0, "data_position": 0, "lora": {
        "rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "fc_out"], "base": str(base_path),
        "base_fingerprint": ckpt.fingerprint(base_path)}}
    ckpt.save(tmp_path / "ours" / "step_00000000", {"params": adapters}, CFG, meta)
    assert ckpt.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "peft"]) == 0
    from safetensors.numpy import load_file
    theirs, back = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "back"))
    assert theirs.keys() == back.keys() and all(np.array_equal(theirs[k], back[k]) for k in theirs)
    # --lora_from continues that adapter here: step 0 starts from PEFT's weights.
    cont = make_run(tmp_path / "cont", corpus, base_path, total_steps=1, lr=0.0, end_lr=0.0,
                    lora_from=str(tmp_path / "theirs"))
    train.train(cont, jax.devices()[:1])
    _, saved = adapters_of(cont.model_dir)
    np.testing.assert_array_equal(saved["params.h.q_proj.lora_b"], adapters["h"]["q_proj"]["lora_b"])


def test_fingerprint_sees_every_value(tmp_path, base):
    path, params = base
    fp = ckpt.fingerprint(path)
    assert fp == ckpt.fingerprint(path) and len(fp) == 16
    flat = ckpt_io.flat(params)
    edits = {"one vocabulary row": ("wte", (30, slice(None))),
             "inside a layer's matrix": ("h.fc_out.weight", (1, 77, 5)), "a LayerNorm": ("ln_f.bias", (17,))}
    for i, (what, (leaf, idx)) in enumerate(edits.items()):
        changed = {k: v.copy() for k, v in flat.items()}
        changed[leaf][idx] += 1e-3
        ckpt.save(tmp_path / f"edit{i}", {"params": gptj.nest(changed)}, CFG)
        assert ckpt.fingerprint(tmp_path / f"edit{i}") != fp, what
    swapped = {k: v.copy() for k, v in flat.items()}
    swapped["h.q_proj.weight"][0, 3, [4, 9]] = swapped["h.q_proj.weight"][0, 3, [9, 4]]  # the same values, moved
    ckpt.save(tmp_path / "swapped", {"params": gptj.nest(swapped)}, CFG)
    assert ckpt.fingerprint(tmp_path / "swapped") != fp


def test_merged_weights_stay_float32_over_a_bf16_base(tmp_path, base):
    """A merged weight is computed from several stored leaves: it keeps float32, where bf16 would round most of a
    small update away; untargeted leaves keep the base's bf16."""
    _, params = base
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    ckpt.save(tmp_path / "bf16", {"params": bf16}, CFG)
    adapters = random_adapters(CFG, 4, ["q_proj"], 3)
    info = {"rank": 4, "alpha": 8.0, "targets": ["q_proj"], "base": str(tmp_path / "bf16"),
            "base_fingerprint": ckpt.fingerprint(tmp_path / "bf16")}
    ckpt.save(tmp_path / "run" / "step_00000001", {"params": adapters}, CFG, {"step": 1, "lora": info})
    merged, _ = ckpt.load_weights(tmp_path / "run")
    want = (np.asarray(bf16["h"]["q_proj"]["weight"], np.float32) + np.float32(2.0) * np.einsum(
        "lir,lro->lio", adapters["h"]["q_proj"]["lora_a"], adapters["h"]["q_proj"]["lora_b"]))
    assert merged["h"]["q_proj"]["weight"].dtype == np.float32 and merged["h"]["k_proj"]["weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(merged["h"]["q_proj"]["weight"], want)
    # A damaged "lora" section is one error naming the file, not a traceback.
    ckpt.save(tmp_path / "bad" / "step_00000001", {"params": adapters}, CFG, {"step": 1, "lora": {"rank": 4}})
    with pytest.raises(ValueError, match="its 'lora' section lacks a valid 'alpha': damaged"):
        ckpt.load_weights(tmp_path / "bad")


def test_plan_counts_the_frozen_base_apart():
    run = config.Run(**{**config.KEYS, **TINY, **LORA, "cores_per_replica": 2})
    t = train.Trainer(run, jax.devices())
    out = plan.plan(t)
    adapters = sum(math.prod(s) for s in lora.shapes(t.cfg, 4, t.targets).values())
    # Per device over mp 2: q and v keep A [2, 32, 4] whole and split B [2, 4, 32]; fc_out splits A [2, 128, 4].
    assert out["params_bytes"] == 4 * (2 * (256 + 128) + 512 + 256)
    assert out["frozen_bytes"] == pytest.approx(4 * t.cfg.n_params() / 2, rel=0.01)  # fp32 on CPUs, over mp 2
    assert out["flops_per_step"] == perf.flops_per_token(t.cfg, run.seq, adapters) * t.tokens_per_step()
    assert perf.flops_per_token(t.cfg, run.seq, adapters) < perf.flops_per_token(t.cfg, run.seq)


def test_bad_lora_input_is_one_line(tmp_path, corpus, base, capsys):
    base_path, _ = base
    flags = ["--model_dir", str(tmp_path / "run"), "--train_set", str(corpus / "train.tokens"),
             "--val_set", str(corpus / "val.tokens"), "--init_from", str(base_path)] + [
        x for k, v in {**TINY, **LORA}.items() for x in (f"--{k}", str(v))]
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}))
    for name, extra in [("alora", {"alora_invocation_tokens": [50256]}), ("pissa", {"init_lora_weights": "pissa"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **extra}))
    other = dataclasses.replace(CFG, d_model=64)
    meta = {"step": 0, "data_position": 0, "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj"], "base": "x",
                                                   "base_fingerprint": "y"}}
    ckpt.save(tmp_path / "wide" / "step_00000000", {"params": random_adapters(other, 4, ["q_proj"], 0)}, other, meta)
    cases = [
        (["--lora_rank", "33"], "lora_rank=33: must be from 1 to 32"),
        (["--lora_targets", "q_proj,attn"], "each must be one of q_proj"),
        (["--init_from", ""], "needs init_from"),
        (["--lora_from", str(tmp_path / "dora"), "--lora_targets", "q_proj"], "use_dora=True is not supported"),
        (["--lora_from", str(tmp_path / "alora"), "--lora_targets", "q_proj"], "alora_invocation_tokens=[50256]"),
        (["--lora_from", str(tmp_path / "pissa"), "--lora_targets", "q_proj"], "init_lora_weights='pissa' rewrites"),
        (["--lora_from", str(tmp_path / "nothing")], "not a PEFT adapter folder"),
        (["--lora_from", str(tmp_path / "dora"), "--lora_rank", "0"], "needs lora_rank > 0"),
    ]
    for args, message in cases:
        assert train.main(flags + args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)
    # A PEFT adapter whose shapes do not fit the base.
    ckpt.main([str(tmp_path / "wide"), str(tmp_path / "wide_peft"), "--to", "peft"])
    assert train.main(flags + ["--lora_from", str(tmp_path / "wide_peft"), "--lora_targets", "q_proj"]) == 1
    assert "the adapter does not fit this base" in capsys.readouterr().err
    # Resuming with the same targets named in another order is the same run; over another base it is refused.
    assert train.main(flags + ["--total_steps", "1"]) == 0
    assert train.main(flags + ["--total_steps", "2", "--lora_targets", "fc_out,v_proj,q_proj"]) == 0
    assert "resumed from" in capsys.readouterr().err
    other_base = tmp_path / "other_base"
    ckpt.save(other_base, {"params": random_params(CFG, 5)}, CFG)
    assert train.main(flags + ["--total_steps", "2", "--init_from", str(other_base)]) == 1
    assert "holds LoRA rank 4" in capsys.readouterr().err
    # A rank that does not fit, read from the lora module directly.
    with pytest.raises(ValueError, match="lora_rank=0"):
        lora.check(CFG, 0, ["q_proj"])


def test_fine_tuning_keeps_the_bases_context(tmp_path, corpus, capsys):
    """Fine-tuned at seq 16, a base of n_ctx 64 stays a model of n_ctx 64: through resume, HF and PEFT export, and
    scoring a text longer than seq in one window of 64 (a model of n_ctx 16 would roll four windows)."""
    cfg = dataclasses.replace(CFG, n_ctx=64)
    base_params = random_params(cfg, 7)
    ckpt.save(tmp_path / "base", {"params": base_params}, cfg)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
                    "and arrows of outrageous fortune, or to take arms against a sea of troubles.")
    tokens = data.tokenizer().encode_ordinary(text.read_text())
    assert TINY["seq"] < len(tokens) < cfg.n_ctx

    def nll(params, **kw):  # one window: the first token conditioned on <|endoftext|>
        x = jnp.asarray([[data.EOT] + tokens[:-1]], jnp.int32)
        logp = jax.nn.log_softmax(gptj.forward(params, x, cfg, **kw)[0][0].astype(jnp.float32))
        return -float(np.take_along_axis(np.asarray(logp, np.float64), np.asarray(tokens)[:, None], 1).mean())

    def scored(checkpoint):
        assert sample.main(["--checkpoint", str(checkpoint), "--score", str(text)]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["tokens"] == len(tokens)
        return got["nll"]

    flags = ["--train_set", str(corpus / "train.tokens"), "--val_set", str(corpus / "val.tokens"), "--init_from",
             str(tmp_path / "base")] + [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    for name, extra in [("lora", [x for k, v in LORA.items() for x in (f"--{k}", str(v))]), ("full", [])]:
        run = tmp_path / name
        assert train.main(flags + extra + ["--model_dir", str(run), "--total_steps", "1", "--warmup_steps", "0"]) == 0
        assert train.main(flags + extra + ["--model_dir", str(run), "--total_steps", "2", "--warmup_steps", "0"]) == 0
        assert "resumed from" in capsys.readouterr().err
        assert ckpt.read_config(run) == cfg
        assert ckpt.main([str(run), str(tmp_path / f"{name}_hf"), "--to", "hf"]) == 0
        assert json.loads((tmp_path / f"{name}_hf" / "config.json").read_text())["n_positions"] == 64
        merged, _ = ckpt.load_weights(run)
        want = nll(merged)
        assert scored(run) == pytest.approx(want, rel=1e-5) and scored(tmp_path / f"{name}_hf") == pytest.approx(
            want, rel=1e-5)
        if name == "lora":  # PEFT's adapter over the base scores as the run does
            assert ckpt.main([str(run), str(tmp_path / "peft"), "--to", "peft"]) == 0
            adapters = ckpt_peft.read_adapters(tmp_path / "peft", cfg, 4, 8.0, LORA["lora_targets"].split(","))
            combined = lora.combine(jax.tree.map(jnp.asarray, base_params), jax.tree.map(jnp.asarray, adapters))
            assert nll(combined, linear=lora.linear_fn(8.0 / 4)) == pytest.approx(want, rel=1e-5)
    # A size that contradicts the weights is refused, not trained.
    assert train.main(flags + ["--model_dir", str(tmp_path / "bad"), "--n_ctx", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "does not match n_ctx 32 (the weights': 64)" in err, err

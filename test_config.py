"""config.py: one typed training config; the original mesh-transformer-jax configs load as they are, defaults give
way to what the user set, and every key is a flag of its type."""
import argparse
import dataclasses
import json
import os
import types

import pytest

import config
import gptj
import shard


def test_every_key_is_a_typed_field_and_a_flag():
    fields = {f.name: f.type for f in dataclasses.fields(config.Run)}
    original = {"layers", "d_model", "n_heads", "n_vocab", "norm", "pe", "pe_rotary_dims", "seq", "cores_per_replica",
                "per_replica_batch", "gradient_accumulation_steps", "warmup_steps", "anneal_steps", "lr", "end_lr",
                "weight_decay", "total_steps", "val_every", "val_batches", "ckpt_every", "keep_every", "tpu_size",
                "model_dir", "train_set", "val_set", "name", "wandb_project"}  # mesh-transformer-jax's own
    assert original <= set(fields) and set(fields) == set(config.KEYS) and all(t in (int, float, str, bool) for k, t in fields.items()
                                                   if k != "val_set")
    assert fields["val_set"] == str | dict and fields["lr"] is float and fields["remat"] is bool
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.Run().lr = 1.0
    assert config.Run().fsdp is False and config.Run().sequence_parallel is False  # new keys: off by default
    ap = argparse.ArgumentParser()
    config.add_flags(ap)
    args = ap.parse_args(["--fsdp", "true", "--sequence_parallel", "1", "--lr", "1e-4", "--layers", "2"])
    assert config.flags(args) == {"fsdp": True, "sequence_parallel": True, "lr": 1e-4, "layers": 2}
    run = config.load_config(None, config.flags(args))
    assert (run.fsdp, run.sequence_parallel, run.lr, run.layers) == (True, True, 1e-4, 2)
    with pytest.raises(config.ConfigError, match="--fsdp 'yes': expected bool"):
        config.parse_flag("fsdp", "yes")


def test_a_config_file_value_must_have_its_keys_type(tmp_path):
    for value, ok in [(1, True), (1.5, True), (True, False), ("1", False)]:  # an int is a float, a bool is not
        (tmp_path / "c.json").write_text(json.dumps({"lr": value}))
        if ok:
            assert config.load_config(str(tmp_path / "c.json")).lr == value and type(config.load_config(
                str(tmp_path / "c.json")).lr) is float
        else:
            with pytest.raises(config.ConfigError, match="key 'lr' must be float"):
                config.load_config(str(tmp_path / "c.json"))
    (tmp_path / "c.json").write_text(json.dumps({"fsdp": 1}))
    with pytest.raises(config.ConfigError, match="key 'fsdp' must be bool"):
        config.load_config(str(tmp_path / "c.json"))


def test_original_config_loads_as_it_is(capsys):
    run = config.load_config("configs/6B_roto_256.json")
    assert dataclasses.replace(run.model(), remat=False) == gptj.GPTJ_6B and run.cores_per_replica == 8
    assert run.remat  # ours: to fit a v3 core's 16 GiB (the plan table, docs/training.md)
    assert "ignoring bucket" in capsys.readouterr().err
    assert config.load_config("configs/6B_v3-8.json", {"lr": 1e-5}).lr == 1e-5
    # The original's example_config.json turns validation off so:
    assert config.load_config("configs/6B_roto_256.json", {"val_batches": 0, "val_set": {}}).val_batches == 0


def test_defaults_give_way_to_what_the_user_set(tmp_path, capsys):
    fit = lambda **kw: config.load_config(None, kw)
    # The final sample shortens to the context (its prompt is one <|endoftext|>) ...
    run = fit(layers=2, d_model=64, n_heads=4, pe_rotary_dims=8, seq=64, per_replica_batch=4)
    assert run.sample_tokens == 63 and "sample_tokens 100 -> 63" in capsys.readouterr().err
    # ... and is skipped, with a note, for a vocabulary that is not GPT-2's.
    assert fit(n_vocab=1024).sample_tokens == 0 and "no final sample: n_vocab=1024" in capsys.readouterr().err
    assert fit(d_model=64, n_heads=8).pe_rotary_dims == 8  # the default 32 is above d_head 8
    assert fit(d_model=36, n_heads=4).pe_rotary_dims == 8  # d_head 9: rotary pairs need an even count
    assert fit(n_ctx=64).seq == 64  # the default seq 128 is above n_ctx
    # What the user set is kept, so that train() can refuse it; so are a named config file's values.
    assert fit(sample_tokens=100, seq=64).sample_tokens == 100
    assert fit(pe_rotary_dims=32, d_model=64, n_heads=8).pe_rotary_dims == 32
    (tmp_path / "c.json").write_text(json.dumps({"seq": 64, "sample_tokens": 100}))
    assert config.load_config(str(tmp_path / "c.json")).sample_tokens == 100
    assert config.load_config("configs/shakespeare.json", {"d_model": 64, "n_heads": 8}).pe_rotary_dims == 32
    assert fit().sample_tokens == 100 and fit(val_batches=0).val_batches == 0  # nothing to fit: unchanged


def test_val_set_object_maps_names_to_specs(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"val_set": {"owt": "owt/*.jsonl", "pile": 3}}))
    with pytest.raises(config.ConfigError, match="must map names to data specs"):
        config.load_config(str(tmp_path / "c.json"))


@pytest.mark.parametrize("name, tpu_size", [("20B_v3-256", 256), ("40B_v3-512", 512)])
def test_the_20b_and_40b_configs_split_evenly_on_their_slices(name, tpu_size):
    """Without libtpu (CI): each config loads, splits evenly on its slice (FSDP's d_model over dp, sequence
    parallel's seq over mp, heads, d_ff and vocab over mp) and takes a million tokens a step. test_plan.py compiles
    them by the TPU compiler where libtpu is installed."""
    run = config.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.json"))
    assert run.tpu_size == tpu_size and run.fsdp and run.sequence_parallel and run.remat
    dp, mp = tpu_size // run.cores_per_replica, run.cores_per_replica
    mesh = types.SimpleNamespace(shape={shard.DP: dp, shard.MP: mp})
    shard.check(run.model("tpu"), mesh, run.per_replica_batch * dp, run.seq, fsdp=True)
    assert run.per_replica_batch * dp * run.gradient_accumulation_steps * run.seq >= 2**20

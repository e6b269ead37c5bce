"""train.py: schedule, weight decay, sharded = unsharded steps (ZeRO included), exact resume, faults, bad input."""
import dataclasses
import functools
import glob
import json
import math
import os
import signal
import struct
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ckpt
import ckpt_io
import config
import data
import gptj
import metrics
import perf
import runtime
import shard
import train
from conftest import TINY, assert_trees_close, assert_updates_close, plain_step

jax.config.update("jax_default_matmul_precision", "highest")

ONE = jax.devices()[:1]  # one device unless a test is about meshes: fewer compiles, same loop


def make_run(tmp_path, corpus, **kw):
    values = {**config.KEYS, **TINY, "model_dir": str(tmp_path / "run"), "train_set": str(corpus / "train.tokens"),
              "val_set": str(corpus / "val.tokens"), **kw}
    return config.Run(**values)


def test_schedule_matches_the_original_formula():
    run = config.Run(**{**config.KEYS, "warmup_steps": 10, "anneal_steps": 100, "lr": 1.0, "end_lr": 0.1})
    lr = train.schedule(run)
    assert float(lr(0)) == 0.0 and math.isclose(float(lr(5)), 0.5)
    assert math.isclose(float(lr(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(lr(60)), 0.55, rel_tol=1e-5)  # halfway down the cosine
    assert math.isclose(float(lr(110)), 0.1, rel_tol=1e-5) and math.isclose(float(lr(10_000)), 0.1, rel_tol=1e-5)
    no_warmup = train.schedule(dataclasses.replace(run, warmup_steps=0))
    assert float(no_warmup(0)) == 1.0 and math.isclose(float(no_warmup(50)), 0.55, rel_tol=1e-5)


def test_weight_decay_only_on_matrices():
    cfg = gptj.Config(n_vocab=64, n_ctx=8, d_model=16, n_layer=2, n_head=2, rotary_dim=4)
    mask = train.decay_mask(gptj.init_params(cfg, jax.random.PRNGKey(0)))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted(["['wte']", "['lm_head']['weight']"] + [
        f"['h']['{n}']['weight']" for n in ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")])


# warmup_steps 0: both steps update at a non-zero learning rate, the second from params the first one produced.
ZERO_RUN = config.Run(**{**config.KEYS, **TINY, "n_vocab": 64, "gradient_accumulation_steps": 2, "weight_decay": 0.1,
                        "warmup_steps": 0})


@functools.cache
def zero_programs(dp, mp, base=None):
    """The sharded Trainer for a mesh (of the run `base`, default ZERO_RUN), compiled once for every example."""
    base = base or ZERO_RUN
    run = dataclasses.replace(base, cores_per_replica=mp, per_replica_batch=8 // dp)
    t = train.Trainer(run, jax.devices()[: dp * mp])
    return run, t, plain_step(base), jax.jit(t.init_state)


@pytest.mark.parametrize("dp, mp", [(2, 2), (4, 2), (2, 4), (8, 1)])
@given(seed=st.integers(0, 2**32 - 1), ids=st.sampled_from(["random", "boundary", "repeated"]))
def test_sharded_zero_step_equals_unsharded(dp, mp, seed, ids):
    """Two optimizer steps of two accumulated micro-batches on a (dp, mp) mesh, optimizer state split over dp
    too, equal plain single-device steps. Both steps run at a non-zero learning rate, and each plain step starts
    from the state the sharded steps reached, so the second one's forward and backward run on params a sharded
    update produced, and a difference cannot hide in the drift of two runs apart. fp32 throughout: the sharded
    step sums the same products in another order (psum over mp, the mean over dp), a few ulps of the summands.
    - Adam's moments hold the gradients, sums that cancel (a bias's gradient adds every token's): 2e-5 of each
      leaf's own scale (2e-6 at worst measured), where a wrong moment is off by all of it.
    - The params, by their update (~lr an element): Adam's g / sqrt(v) turns a gradient at rounding level into
      any fraction of lr, so assert_updates_close holds the elements of clear gradients to 1e-3 of lr, which a
      missing or doubled update (all of it) fails by far, and the rest to their bound."""
    run, t, step, init = zero_programs(dp, mp)
    mu = t.shardings["opt_state"][1].mu
    assert shard.DP in mu["h"]["fc_in"]["weight"].spec and shard.DP in mu["wte"].spec  # ZeRO-1: split over dp
    rng = np.random.default_rng(seed)
    shape = (2, 8, run.seq + 1)
    batches = [{"random": lambda: rng.integers(0, 64, shape),
                "boundary": lambda: rng.choice([0, 1, 62, 63], shape),  # the ends of each device's vocab slice
                "repeated": lambda: np.broadcast_to(rng.integers(0, 64, shape[2:]), shape)}[ids]().astype(np.int32)
               for _ in range(2)]
    sharded = jax.device_put(init(jax.random.PRNGKey(seed)), t.shardings)
    for b in batches:
        start = jax.device_get(sharded)  # a host copy: the sharded step donates its state
        want_state, want = step(start, b)
        sharded, got = t.step(sharded, jax.device_put(b, t.batch_sharding), {}, t.halt(0))
        assert float(want["lr"]) > 0
        assert all(math.isclose(float(got[k]), float(want[k]), rel_tol=1e-5) for k in want)
        assert_trees_close(sharded["opt_state"], want_state["opt_state"], rtol=2e-5)
        assert_updates_close(start, sharded, want_state, float(want["lr"]))


BF16_RUN = dataclasses.replace(ZERO_RUN, dtype="bfloat16")
EPS = 2.0**-8  # bf16's machine epsilon: 8 significant bits


@pytest.mark.parametrize("dp, mp", [(2, 2), (8, 1), (1, 4)])
@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1))
def test_bf16_sharded_step_equals_unsharded(dp, mp, seed):
    """The step accelerators run: fp32 master weights and optimizer state, bf16 compute (dtype bfloat16). Two
    steps on a (dp, mp) mesh equal plain single-device bf16 steps, each from the state the sharded steps reached.
    The paths round activations to bf16 at different points (a psum of partial products rounded apart), so they
    agree to bf16's precision, not fp32's: in units of EPS (measured worst in brackets), the loss to 1 (0.03),
    the gradient norm to 1 (0.16), Adam's first moment to 16 of its own scale (4.6), the second, squares of the
    gradients, to 32 (8.5); updates where the gradient is above a tenth of its leaf's largest to 0.1 lr (0.033).
    A shard's contribution lost or counted twice moves any of these by far more than their tolerance."""
    run, t, step, init = zero_programs(dp, mp, BF16_RUN)
    assert t.cfg.dtype == "bfloat16" and t.shapes["params"]["wte"].dtype == jnp.float32  # fp32 masters
    rng = np.random.default_rng(seed)
    sharded = jax.device_put(init(jax.random.PRNGKey(seed)), t.shardings)
    for _ in range(2):
        b = rng.integers(0, 64, (2, 8, run.seq + 1)).astype(np.int32)
        start = jax.device_get(sharded)
        want_state, want = step(start, b)
        sharded, got = t.step(sharded, jax.device_put(b, t.batch_sharding), {}, t.halt(0))
        assert float(want["lr"]) > 0
        assert math.isclose(float(got["loss"]), float(want["loss"]), rel_tol=EPS)
        assert math.isclose(float(got["grad_norm"]), float(want["grad_norm"]), rel_tol=EPS)
        adam = lambda state: state["opt_state"][1]
        assert_trees_close(adam(sharded).mu, adam(want_state).mu, rtol=16 * EPS)
        assert_trees_close(adam(sharded).nu, adam(want_state).nu, rtol=32 * EPS)
        assert_updates_close(start, sharded, want_state, float(want["lr"]), clear=0.1, tol=0.1)


def test_bf16_gradient_accumulation():
    """grad_acc_dtype bfloat16 sums four micro-batches' gradients in bf16: the same loss, and gradients within
    bf16's rounding of a four-term sum of the fp32 ones (measured worst in brackets): the norm to 1 EPS
    (0.02), Adam's first moment (the gradient, at step 1) to 4 EPS of each leaf's scale (1.6). Not equal
    either: the sum really is in bf16."""
    base = dataclasses.replace(ZERO_RUN, gradient_accumulation_steps=4, per_replica_batch=2)
    t = train.Trainer(base, ONE)
    state = t.init_state(jax.random.PRNGKey(0))
    batch = np.random.default_rng(0).integers(0, 64, (4, 2, base.seq + 1)).astype(np.int32)
    (s32, m32), (s16, m16) = (plain_step(dataclasses.replace(base, grad_acc_dtype=d))(state, batch)
                              for d in ("float32", "bfloat16"))
    assert float(m16["loss"]) == float(m32["loss"])
    assert 0 < abs(float(m16["grad_norm"]) / float(m32["grad_norm"]) - 1) <= EPS
    assert_trees_close(s16["opt_state"][1].mu, s32["opt_state"][1].mu, rtol=4 * EPS)


def test_float16_trains():
    """dtype float16 computes in fp16 over fp32 master weights: one step runs, its loss within fp16's eps
    (2^-10) of the fp32 step's (0.01 of it measured), every leaf's update finite and about lr (1 to 1.04 lr
    measured: Adam's first step). No loss scaling: these gradients sit well inside fp16's range."""
    run = dataclasses.replace(ZERO_RUN, dtype="float16")
    state = train.Trainer(run, ONE).init_state(jax.random.PRNGKey(0))
    batch = np.random.default_rng(0).integers(0, 64, (2, 8, run.seq + 1)).astype(np.int32)
    (s16, m16), (_, m32) = plain_step(run)(state, batch), plain_step(ZERO_RUN)(state, batch)
    assert math.isclose(float(m16["loss"]), float(m32["loss"]), rel_tol=2.0**-10)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), s16["params"], state["params"])
    assert all(np.isfinite(x) and 0.5 * run.lr < x < 2 * run.lr for x in jax.tree.leaves(moved)), moved


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 accumulated in one step give the loss, gradient norm and update of one batch of 8."""
    run = config.Run(**{**config.KEYS, **TINY, "n_vocab": 64, "warmup_steps": 0})  # the full lr from the first step
    t = train.Trainer(run, ONE)
    _, step = train.make_step(run, t.cfg, None)
    step = jax.jit(step)
    state = t.init_state(jax.random.PRNGKey(0))
    batch = np.random.default_rng(0).integers(0, 64, (1, 8, run.seq + 1)).astype(np.int32)
    (one, m1), (two, m2) = step(state, batch), step(state, batch.reshape(2, 4, run.seq + 1))
    assert math.isclose(float(m1["loss"]), float(m2["loss"]), rel_tol=1e-6)
    assert math.isclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rel_tol=1e-5)
    assert not np.array_equal(one["params"]["wte"], state["params"]["wte"])  # the step did update (lr 3e-3)
    # Adam's first update is g / |g| per parameter: rounding moves it most where g is tiny.
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(one), jax.tree.leaves(two)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, jax.tree_util.keystr(path[0])


def params_of(model_dir):
    return {k: np.asarray(v) for k, v in ckpt_io.flat(ckpt.load(ckpt.latest(model_dir))).items()}


def test_stop_by_signal_and_resume_is_bit_identical(tmp_path, corpus, monkeypatch):
    whole = make_run(tmp_path / "a", corpus)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    last = train.train(whole, ONE)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # restored
    assert last["step"] == 4 and "val_loss" in last
    records = [json.loads(line) for line in open(os.path.join(whole.model_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0]) and "val_loss" in records[1]

    # SIGTERM arrives while step 3 runs (as a preemption would): the run saves step 3 and returns.
    cut = make_run(tmp_path / "b", corpus)
    real = data.Stream.rows
    def rows(self, positions):
        if positions[0] == 2 * len(positions):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, positions)
    monkeypatch.setattr(data.Stream, "rows", rows)
    assert train.train(cut, ONE)["step"] == 3
    monkeypatch.setattr(data.Stream, "rows", real)
    assert os.path.basename(ckpt.latest(cut.model_dir)) == "step_00000003"
    assert ckpt.read_meta(ckpt.latest(cut.model_dir))["data_position"] == 3 * 2  # 3 steps of 2 rows

    train.train(cut, ONE)  # resumes at step 3 and finishes
    a, b = params_of(whole.model_dir), params_of(cut.model_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    like = train.Trainer(whole, ONE).shapes
    opt_a, opt_b = (ckpt.load(ckpt.latest(r.model_dir), like=like) for r in (whole, cut))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(opt_a), jax.tree.leaves(opt_b)))


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler during the test, whatever the process inherited: a background job of a
    non-interactive shell starts with SIGINT ignored, and train.py rightly restores what it found."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_second_interrupt_is_not_caught(tmp_path, corpus, monkeypatch, python_sigint):
    run = make_run(tmp_path, corpus)
    real = data.Stream.rows
    def rows(self, positions):
        if positions[0] == 2 * len(positions):  # a stuck step: Ctrl-C, and again
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, positions)
    monkeypatch.setattr(data.Stream, "rows", rows)
    with pytest.raises(KeyboardInterrupt):
        train.train(run, ONE)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert os.path.basename(ckpt.latest(run.model_dir)) == "step_00000002"  # what was saved stays


def wandb_records(path):
    """The records of a W&B transaction log (run-ID.wandb): a header, then LevelDB's log format (32 KiB blocks
    of chunks: crc32c, length, kind) holding wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    buf = open(path, "rb").read()
    assert buf[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        pending, pos = pending + buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_logs_every_record_and_a_resumed_run_continues_it(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the real wandb package, writing its run files locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = make_run(tmp_path, corpus, wandb_project="gptj-tests", name="tiny-run", total_steps=2)
    train.train(run, ONE)
    train.train(dataclasses.replace(run, total_steps=3), ONE)  # resumes at step 2
    logged = [json.loads(line) for line in open(os.path.join(run.model_dir, "metrics.jsonl"))]
    assert [r["step"] for r in logged] == [1, 2, 3]
    runs = sorted(glob.glob(os.path.join(run.model_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(runs) == 2
    # wandb's service process may still be writing a run's log after finish() returns: read until every record
    # has arrived, for at most a minute.
    deadline = time.monotonic() + 60
    while True:
        seen, ids = [], set()
        try:
            records = [r for path in runs for r in wandb_records(path)]
        except Exception:  # a record half written
            if time.monotonic() > deadline:
                raise
            records = []
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                assert (r.run.project, r.run.display_name) == ("gptj-tests", "tiny-run")
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                seen.append({"step": items["_step"]} | {k: v for k, v in items.items() if not k.startswith("_")})
        if len(seen) >= len(logged) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ids) == 1 and open(os.path.join(run.model_dir, "wandb_id")).read().strip() in ids  # one W&B run
    assert seen == logged  # every record, with the training step as W&B's step, val_loss included

    # Without wandb installed: one line says so, and the records still go to metrics.jsonl.
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    capsys.readouterr()
    log = metrics.MetricsLog(run)
    assert "wandb is not installed (pip install wandb)" in capsys.readouterr().err
    log.write({"step": 4, "loss": 1.0})
    log.close(failed=False)
    assert json.loads(open(os.path.join(run.model_dir, "metrics.jsonl")).readlines()[-1]) == {"step": 4, "loss": 1.0}


def test_restore_onto_another_mesh_and_init_from(tmp_path, corpus, capsys):
    first = make_run(tmp_path, corpus, cores_per_replica=2, per_replica_batch=1, total_steps=2)
    train.train(first, jax.devices()[:4])  # dp 2, mp 2
    resumed = make_run(tmp_path, corpus, cores_per_replica=1, per_replica_batch=2, total_steps=3)
    t = train.Trainer(resumed, ONE)
    saved = ckpt.load(ckpt.latest(first.model_dir), like=t.shapes)
    placed = ckpt.load(ckpt.latest(first.model_dir), like=t.shapes, mesh=t.mesh, specs=t.shardings)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(placed)))
    assert train.train(resumed, ONE)["step"] == 3
    assert "resumed from" in capsys.readouterr().err
    # init_from: the weights with a fresh optimizer at step 0, in a new model_dir.
    fresh = make_run(tmp_path / "ft", corpus, init_from=str(tmp_path / "run"), total_steps=1, ckpt_every=0,
                     val_batches=0)
    assert "val_loss" not in train.train(fresh, ONE)  # val_batches 0: no validation
    meta = ckpt.read_meta(ckpt.latest(fresh.model_dir))
    assert meta["step"] == 1 and "initialised from" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    run = make_run(tmp_path, corpus, total_steps=2, ckpt_every=1)
    train.train(run, ONE)
    blowup = make_run(tmp_path, corpus, total_steps=6, lr=1e30, warmup_steps=0)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4"):
        train.train(blowup, ONE)
    assert os.path.basename(ckpt.latest(run.model_dir)) == "step_00000002"


def test_validation_set_smaller_than_a_batch_is_evaluated(tmp_path, corpus):
    seq = TINY["seq"]
    tokens = np.asarray(data.load_tokens(str(corpus / "val.tokens")))[:3 * seq + 1]
    tokens.tofile(tmp_path / "three_windows.tokens")  # a batch has 4 rows
    run = make_run(tmp_path, corpus, val_set=str(tmp_path / "three_windows.tokens"), per_replica_batch=4,
                   total_steps=1)
    last = train.train(run, ONE)
    params, _ = ckpt.load_weights(run.model_dir)
    windows = np.stack([tokens[i * seq: (i + 1) * seq + 1] for i in range(3)]).astype(np.int32)
    want = gptj.loss_fn(params, jnp.asarray(windows), run.model())  # the padding row counts for nothing
    assert math.isclose(last["val_loss"], float(want), rel_tol=1e-5)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, corpus, capsys):
    run = make_run(tmp_path, corpus, total_steps=2, ckpt_every=1)
    train.train(run, ONE)
    leaf = os.path.join(run.model_dir, "step_00000002", "params.wte.bin")
    with open(leaf, "r+b") as f:
        f.truncate(100)
    train.train(make_run(tmp_path, corpus, total_steps=3, ckpt_every=1), ONE)
    err = capsys.readouterr().err
    assert "step_00000002" in err and "resumed from" in err and "step_00000001" in err


def test_mfu_divides_by_the_highest_peak_read(tmp_path, monkeypatch):
    """A shared CPU can read its matmul peak a third low: the peak is read again each minute and the highest
    kept, so one low reading does not inflate mfu for the rest of the run."""
    peaks = iter([300e9, 200e9])
    monkeypatch.setattr(perf, "device_peak", lambda device, dtype: 100e9)  # the process's first reading
    monkeypatch.setattr(perf, "matmul_peak", lambda device, dtype, readings=4: next(peaks))
    clock = iter(range(0, 10**6, 61))  # a minute passes between any two readings of the clock
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: float(next(clock)))
    cfg = config.Run(**{**config.KEYS, **TINY}).model()
    mesh = types.SimpleNamespace(size=1, shape={shard.MP: 1})
    t = types.SimpleNamespace(device=jax.devices()[0], cfg=cfg, mesh=mesh, dp=1, flops_per_token=lambda: 1e9,
                              tokens_per_step=lambda: 1000)
    run = config.Run(**{**config.KEYS, "model_dir": str(tmp_path), "total_steps": 3})
    with metrics.Progress(run, t, 0, 3000) as progress:  # reads 100e9 at the start
        records = [progress(step, {"loss": 1.0, "lr": 0.0}, dict) for step in (1, 2)]  # then 300e9, 200e9
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * 1e9 / 300e9)


def test_benchmark_prints_speed_and_mfu(capsys):
    flags = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    assert train.main(["--benchmark", "--benchmark_steps", "2"] + flags) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["compile_s"] > 0 and 0 < out["mfu"] < 1
    assert out["tokens_per_s"] == pytest.approx(8 * 2 * 16 / out["step_s"], rel=0.01)  # dp 8 x batch 2 x seq 16
    cfg = config.Run(**{**config.KEYS, **TINY}).model()
    # 6 FLOPs per parameter but wte (a lookup), counted from the params themselves, + attention
    shapes = jax.eval_shape(lambda key: gptj.init_params(cfg, key), jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves({k: v for k, v in shapes.items() if k != "wte"}))
    assert perf.flops_per_token(cfg, 16) == 6 * n + 12 * cfg.n_layer * cfg.d_model * 16
    expected = perf.flops_per_token(cfg, 16) * 256 / out["step_s"] / out["peak_flops"]
    assert out["mfu"] == pytest.approx(expected, rel=0.01, abs=1e-4)  # the record rounds mfu to 4 decimals


def test_cpu_step_compiles_without_ynnpack_fusions():
    t = train.Trainer(config.Run(**{**config.KEYS, **TINY}), ONE)
    assert "__ynn_fusion" not in t.lower().compile().as_text()
    column_sum = jax.jit(lambda x: x.sum(0)).lower(jnp.ones((64, 64)))  # what the option is there for
    assert "__ynn_fusion" in column_sum.compile().as_text()
    assert "__ynn_fusion" not in column_sum.compile(runtime.compiler_options(t.device)).as_text()


def test_one_device_step_has_no_collectives_and_no_transposed_logit_gradient():
    t = train.Trainer(config.Run(**{**config.KEYS, **TINY, "per_replica_batch": 3}), ONE)  # 3 x 16 != d_model
    hlo = t.lower().compile().as_text()
    assert "all-reduce" not in hlo  # no shard_map on one device: its backward psums every gradient
    # From 3-D activations XLA:CPU transposed the logits' gradient, to [n_vocab, batch, seq], for the
    # lm_head weight gradient.
    assert "f32[50304,3,16]" not in hlo and "f32[50304,48]" not in hlo


def test_the_issue_command_trains_and_samples(tmp_path, corpus, capsys):
    """A small valid config, every other key default, trains to the end and prints its shortened sample."""
    flags = dict(layers=2, d_model=64, n_heads=4, pe_rotary_dims=8, seq=64, per_replica_batch=4, total_steps=2,
                 model_dir=str(tmp_path / "run"), train_set=str(corpus / "train.tokens"),
                 val_set=str(corpus / "val.tokens"))
    train.train(config.load_config(None, flags), ONE)
    out = capsys.readouterr()
    assert "sample:" in out.out and "sample_tokens 100 -> 63" in out.err


@pytest.mark.parametrize("args, message", [
    (["--train_set", "/nonexistent/*.txt"], "matches no"),
    (["--config", "{tmp}/unknown.json"], "unknown key(s) colour"),
    (["--config", "{tmp}/badtype.json"], "key 'layers' must be int"),
    (["--layers", "two"], "--layers 'two': expected int"),
    (["--cores_per_replica", "3"], "cores_per_replica=3 does not divide the 8 devices"),
    (["--seq", "512", "--n_ctx", "256"], "seq=512 is above the model's context n_ctx=256"),
    (["--pe", "sinusoidal"], "GPT-J uses norm 'layernorm' and pe 'rotary'"),
    (["--train_set", "{tmp}/empty.txt"], "empty (0 tokens)"),
    (["--model_dir", "{tmp}/other"], "holds a different model (n_layer 3 vs 2"),
    (["--keep_last", "0"], "keep_last=0: must be at least 1"),
    (["--warmup_steps", "-5"], "warmup_steps=-5: must be at least 0"),
    (["--grad_acc_dtype", "bf16"], "grad_acc_dtype='bf16': must be one of float32, bfloat16"),
    (["--sample_tokens", "20"], "sample_tokens=20: the final sample needs"),  # seq (so n_ctx) is 16
    (["--plan", "--topology", "v5e"], "--topology 'v5e': expected NAME:AxB or NAME:AxBxC"),
    (["--n_vocab", "1024"], "val_set holds token id"),
    (["--n_vocab", "1024", "--val_set", ""], "train_set holds token id"),  # found in its first batch
])
def test_bad_input_is_one_line_and_exits_nonzero(tmp_path, corpus, capsys, args, message):
    (tmp_path / "unknown.json").write_text(json.dumps({"layers": 2, "colour": "red"}))
    (tmp_path / "badtype.json").write_text(json.dumps({"layers": "2"}))
    (tmp_path / "empty.txt").write_text("")
    cfg = make_run(tmp_path, corpus, layers=3).model()
    ckpt.save(str(tmp_path / "other" / "step_00000001"), {"params": gptj.init_params(cfg, jax.random.PRNGKey(0))},
              cfg, {"step": 1, "data_position": 0})
    base = ["--model_dir", str(tmp_path / "run"), "--train_set", str(corpus / "train.tokens"), "--val_set",
            str(corpus / "val.tokens")] + [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    assert train.main(base + [a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err

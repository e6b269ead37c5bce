"""plan.py (`train.py --plan`): the step's per-device memory without the devices, by XLA:CPU on simulated devices
or by the TPU compiler (libtpu) for a TPU topology, and the verdict against a device's memory."""
import json
import os
import subprocess
import sys

import jax
import pytest

import config
import perf
import plan
import train
from conftest import TINY


def test_plan_reports_per_device_memory():
    run = config.Run(**{**config.KEYS, **TINY, "cores_per_replica": 2, "gradient_accumulation_steps": 2})
    out = plan.plan(train.Trainer(run, jax.devices()))
    assert out["devices"] == 8 and out["mesh"] == {"dp": 4, "mp": 2} and out["platform"] == "cpu"
    assert out["frozen_bytes"] == 0  # full fine-tuning: every param trains
    cfg = run.model()
    assert out["n_params"] == cfg.n_params() and out["fits"] is None  # no tpu_size: no device memory to judge by
    assert out["params_bytes"] == pytest.approx(4 * cfg.n_params() / 2, rel=0.01)
    assert out["opt_state_bytes"] == pytest.approx(2 * out["params_bytes"] / 4, rel=0.05)  # ZeRO: / dp
    assert out["total_bytes"] == out["params_bytes"] + out["opt_state_bytes"] + out["temp_bytes"]
    assert out["flops_per_step"] == perf.flops_per_token(cfg, 16) * 2 * 8 * 16


def test_plan_targets_the_tpu_of_tpu_size():
    assert [plan.v3_topology(n) for n in (8, 32, 64, 256, 2048)] == ["v3:2x2", "v3:4x4", "v3:4x8", "v3:8x16",
                                                                      "v3:32x32"]
    with pytest.raises(config.ConfigError, match="tpu_size=12: a TPU v3 slice has 2\\^k cores"):
        plan.v3_topology(12)


def plan_process(*flags, libtpu=False):
    """train.py --plan in a fresh process with the README's environment (no simulated devices), its JSON line and
    its last stderr line. Without libtpu=True, libtpu is hidden where installed: the XLA:CPU path."""
    code = f"import sys, plan, train; plan.has_libtpu = lambda: {libtpu}; sys.exit(train.main(sys.argv[1:]))"
    flags = ["--plan"] + [x for k, v in TINY.items() for x in (f"--{k}", str(v))] + list(flags)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-c", code] + flags, capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = res.stdout.strip().splitlines()
    return res.returncode, json.loads(lines[-1]) if lines else None, (res.stderr.strip().splitlines() or [""])[-1]


def test_plan_in_a_fresh_process_on_cpus_says_whether_it_fits():
    # A v3-8 config without libtpu: 8 simulated CPU devices, judged by a v3 core's 16 GiB.
    code, out, err = plan_process("--tpu_size", "8", "--cores_per_replica", "2")
    assert code == 0, err
    assert (out["platform"], out["devices"], out["mesh"]) == ("cpu", 8, {"dp": 4, "mp": 2})
    assert out["fits"] is True and out["available_bytes"] == 16 * 2**30 and out["total_bytes"] < 2**30
    assert out["n_params"] == config.Run(**{**config.KEYS, **TINY}).model().n_params()
    code, out, err = plan_process("--device_memory", "0.001")  # 1 MiB a device cannot hold the step
    assert code == 1 and out["fits"] is False and out["total_bytes"] > out["available_bytes"] == round(2**30 / 1000)
    assert err.startswith("error: ") and "does not fit" in err


@pytest.mark.skipif(not plan.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]'), 700 MB: not in CI")
def test_plan_compiles_for_a_tpu_without_one():
    run = config.Run(**{**config.KEYS, **TINY, "tpu_size": 8, "cores_per_replica": 2})
    devices, topology = plan.plan_devices(run)
    out = plan.plan(train.Trainer(run, devices), topology)
    assert (out["platform"], out["device_kind"], out["topology"], out["devices"]) == ("tpu", "TPU v3", "v3:2x2", 8)
    assert out["dtype"] == "bfloat16"  # auto, for the TPU
    assert out["fits"] is True and out["available_bytes"] == 16 * 2**30
    # Logits of 64 rows x 2048 positions x 50304 in fp32 are 26 GB a core: the TPU compiler's refusal is the answer.
    code, out, err = plan_process("--tpu_size", "8", "--seq", "2048", "--per_replica_batch", "64", libtpu=True)
    assert code == 1 and out["fits"] is False and out["needed_bytes"] > out["available_bytes"] > 15 * 2**30, err
    assert out["compiler"].startswith("RESOURCE_EXHAUSTED") and err.startswith("error: ") and "does not fit" in err


@pytest.mark.skipif(not plan.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]'), 700 MB: not in CI")
@pytest.mark.parametrize("name, n_params, chips", [("20B_v3-256", 20.5e9, 256), ("40B_v3-512", 39.5e9, 512)])
def test_the_20b_and_40b_configs_fit_their_slices(name, n_params, chips):
    """GPT-J at 20B on a v3-256 and 40B on a v3-512, FSDP and sequence parallel, a million tokens a step: within
    a v3 core's 16 GiB by the TPU compiler's own count (1 to 2 minutes a plan here)."""
    run = config.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.json"))
    assert run.fsdp and run.sequence_parallel and run.remat and run.dtype == "bfloat16"
    devices, topology = plan.plan_devices(run)
    t = train.Trainer(run, devices)
    assert t.tokens_per_step() >= 2**20 and len(devices) == chips
    out = plan.plan(t, topology)
    assert out["n_params"] == pytest.approx(n_params, rel=0.01) and out["platform"] == "tpu"
    assert out["fits"] is True and out["total_bytes"] <= 16 * 2**30, out

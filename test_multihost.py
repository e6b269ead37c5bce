"""train.py over several processes on loopback, as on the hosts of a pod slice: each process with its own
simulated CPU devices, JAX's distributed runtime between them, gloo for the collectives.

These start real processes and compile in each: they are few and tiny, and each launch is bounded (`finish`)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest

import ckpt
import data
import runtime
import sample
import shard
import train
from test_train import corpus  # noqa: F401 (a fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(layers=2, d_model=32, n_heads=4, pe_rotary_dims=4, n_vocab=50304, seq=16, per_replica_batch=2,
            cores_per_replica=2, warmup_steps=2, anneal_steps=10, lr=3e-3, end_lr=3e-4, total_steps=4, val_every=2,
            val_batches=2, ckpt_every=2, log_every=1, sample_tokens=0)
HEARTBEAT_S = 5  # how long a lost peer goes unnoticed, here; the default is runtime.HEARTBEAT_S


@pytest.fixture(scope="module")
def setup(corpus):
    """test_train's corpus, and a config file naming it: every process reads the same files."""
    config = {**TINY, "train_set": str(corpus / "train.tokens"), "val_set": str(corpus / "val.tokens")}
    with open(corpus / "tiny.json", "w") as f:
        json.dump(config, f)
    return corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup, model_dir, processes: int, devices: int, extra=(), per_process=None):
    """Start `processes` train.py processes of one run, `devices` simulated CPU devices each. (They share the
    session's compilation cache, conftest.py's: the same programs in every launch are compiled once.)"""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PYTHONUNBUFFERED": "1"}
    port, procs = free_port(), []
    for i in range(processes):
        args = [sys.executable, os.path.join(HERE, "train.py"), "--config", str(setup / "tiny.json"),
                "--model_dir", str(model_dir), *extra, *(per_process(i) if per_process else ())]
        if processes > 1:
            args += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                     "--process_id", str(i), "--heartbeat_timeout_seconds", str(HEARTBEAT_S)]
        procs.append(subprocess.Popen(args, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs, timeout=240):
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


def run(setup, model_dir, processes, devices, extra=(), **kw):
    results = finish(launch(setup, model_dir, processes, devices, extra, **kw))
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
    return results


def error_line(stderr, text):
    """train.py's one-line error holding `text` (JAX and gloo may log around it)."""
    return any(line.startswith("error: ") and text in line for line in stderr.splitlines())


def leaves(model_dir):
    return {k: np.asarray(v) for k, v in ckpt._flat(ckpt.load(ckpt.latest(model_dir))).items()}


def losses(model_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(model_dir, "metrics.jsonl"))]


def assert_close(a, b):
    """Each leaf equal to 1e-6 relative, as a vector (the norm of the difference over the leaf's norm). Not per
    element: Adam moves a parameter by about lr for any gradient, however small, so where a gradient is ~0 (a
    vocabulary row no batch used but through the softmax) a rounding difference in it moves that element by a
    whole step (measured here: 5.8e-5 of the largest wte entry, 1.8e-7 by norm)."""
    assert a.keys() == b.keys()
    for k in a:
        diff = np.linalg.norm(a[k].astype(np.float64) - b[k])
        assert diff <= 1e-6 * np.linalg.norm(b[k].astype(np.float64)), k


@pytest.fixture(scope="module")
def references(setup):
    """The same run in 1 process of 8 devices and in 2 processes of 4 (mesh dp 4, mp 2 in both)."""
    one, two = setup / "one", setup / "two"
    run(setup, one, 1, 8)
    results = run(setup, two, 2, 4)
    return one, two, results


def test_two_processes_train_as_one(setup, references, capsys):
    one, two, results = references
    (_, out0, err0), (_, out1, err1) = results
    # Only process 0 reports. (Process 1's stdout holds gloo's C++ logs, whose threads can interleave mid-line.)
    assert "step 4/4" in out0 and not re.search(r"step \d+/|loss|sample:", out1)
    assert "2 process(es)" in err0 and "mesh dp=4 mp=2" in err0
    assert not os.path.exists(two / "metrics.jsonl.1")
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6)
    assert len(losses(two)) == 4
    assert_close(leaves(two), leaves(one))  # the 2-process checkpoint reads in this one process
    meta = ckpt.read_meta(ckpt.latest(two))
    assert meta["processes"] == 2 and any("pieces" in v for v in meta["leaves"].values())
    # sample.py reads it too.
    assert sample.main(["--checkpoint", str(two), "--prompt", "To be", "--max_new_tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("To be")


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bit_identical(setup, references):
    _, two, _ = references
    cut = setup / "cut"
    procs = launch(setup, cut, 2, 4, ["--total_steps", "40", "--ckpt_every", "0", "--val_every", "0"])
    deadline = time.time() + 200
    while not os.path.exists(cut / "metrics.jsonl") or len(open(cut / "metrics.jsonl").readlines()) < 2:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # to process 1 only: process 0 learns of it through the next step
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results[1][2][-3000:]
    stopped = ckpt.read_meta(ckpt.latest(cut))["step"]
    assert 2 <= stopped < 40 and "stopped by a signal" in results[0][2]
    # Resumed with the reference's settings, it ends where an uninterrupted run ends: to the bit.
    if stopped < TINY["total_steps"]:
        run(setup, cut, 2, 4)
        a, b = leaves(cut), leaves(two)
        assert all(np.array_equal(a[k], b[k]) for k in b)
    else:  # stopped past the reference's end: the reference resumed to this step gives the same bits
        longer = setup / "longer"
        os.makedirs(longer)
        os.symlink(ckpt.latest(two), longer / os.path.basename(ckpt.latest(two)))
        run(setup, longer, 2, 4, ["--total_steps", str(stopped), "--ckpt_every", "0", "--val_every", "0"])
        a, b = leaves(cut), leaves(longer)
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_one_process_checkpoint_resumes_in_two(setup, references):
    one, _, _ = references
    half = setup / "half"
    os.makedirs(half)
    os.symlink(one / "step_00000002", half / "step_00000002")  # written by 1 process: resume it in 2
    (_, out0, _), (_, out1, _) = run(setup, half, 2, 4, ["--sample_tokens", "3"])
    assert_close(leaves(half), leaves(one))
    assert "sample:" in out0 and "sample:" not in out1  # the final sample, on both, printed by process 0


def test_init_from_and_benchmark_on_two_processes(setup, references):
    one, _, _ = references
    (_, out0, err0), _ = run(setup, setup / "fine-tuned", 2, 4, ["--init_from", str(one), "--total_steps", "1",
                                                                  "--val_batches", "0"])
    assert "initialised from" in err0 and "step 1/1" in out0
    (_, out0, _), (_, out1, _) = run(setup, setup / "bench", 2, 4, ["--benchmark", "--benchmark_steps", "1"])
    record = json.loads(out0.strip().splitlines()[-1])
    assert record["devices"] == 8 and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
    assert '"tokens_per_s"' not in out1  # process 0 reports


def test_a_killed_peer_ends_the_survivor_within_the_heartbeat(setup):
    procs = launch(setup, setup / "killed", 2, 4, ["--total_steps", "1000", "--ckpt_every", "0", "--val_every", "0"])
    deadline = time.time() + 200
    while not os.path.exists(setup / "killed" / "metrics.jsonl"):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].kill()
    start = time.time()
    rc, _, _ = finish(procs[:1], timeout=6 * HEARTBEAT_S)[0]
    procs[1].wait()
    assert rc != 0 and time.time() - start < 6 * HEARTBEAT_S


def test_an_error_one_process_sees_ends_both_with_its_message(setup):
    missing = str(setup / "not-on-this-host.tokens")
    start = time.time()
    results = finish(launch(setup, setup / "missing", 2, 4,
                            per_process=lambda i: ["--train_set", missing] if i == 1 else []))
    assert time.time() - start < 60  # not the 5-minute shutdown barrier
    assert [rc for rc, _, _ in results] == [1, 1]
    assert error_line(results[1][2], "not-on-this-host.tokens")
    assert "process 1 failed" in results[0][2] and "not-on-this-host.tokens" in results[0][2]


def test_a_bad_token_in_one_process_rows_ends_both(setup):
    """A token id past n_vocab in a window that only process 1 builds, at step 3: both stop there, and the
    checkpoint of step 2 is the newest."""
    tokens = np.fromfile(setup / "train.tokens", data.TOKEN_DTYPE).copy()
    order = data.Stream(tokens, TINY["seq"], 0).order(0)
    batch = 4 * TINY["per_replica_batch"]  # dp 4
    window = int(order[3 * batch - 1])  # step 3's last row: process 1's
    tokens[window * TINY["seq"] + 3] = 60000
    tokens.tofile(setup / "bad.tokens")
    results = finish(launch(setup, setup / "bad", 2, 4, ["--train_set", str(setup / "bad.tokens")]))
    assert [rc for rc, _, _ in results] == [1, 1]
    assert error_line(results[1][2], "60000") and error_line(results[0][2], "process 1 failed")
    assert os.path.basename(ckpt.latest(setup / "bad")) == "step_00000002"


class Device(NamedTuple):
    id: int
    process_index: int


def test_a_model_replica_stays_within_a_host():
    """Slurm on two GPU hosts, a process per pair of GPUs: processes 0 and 2 on host a, 1 and 3 on b."""
    devices = [Device(10 * p + i, p) for p in (3, 2, 1, 0) for i in (1, 0)]
    hosts = {0: "a", 1: "b", 2: "a", 3: "b"}
    order = shard.host_order(devices, 4, hosts)
    assert [(d.process_index, d.id) for d in order] == [(0, 0), (0, 1), (2, 20), (2, 21), (1, 10), (1, 11), (3, 30),
                                                        (3, 31)]
    with pytest.raises(ValueError, match="cores_per_replica=8 cannot be placed: a has 4 devices.*divisor of 4"):
        shard.host_order(devices, 8, hosts)
    assert shard.host_order(devices, 8, dict.fromkeys(range(4), "one")) == sorted(devices, key=lambda d: (d[1], d[0]))
    with pytest.raises(ValueError, match="cores_per_replica=3 does not divide the 8 devices"):
        shard.host_order(devices, 3)


class Subset:
    """A sharding seen from a process that holds only some of its devices."""

    def __init__(self, sharding, devices):
        self.sharding, self.devices = sharding, set(devices)

    def addressable_devices_indices_map(self, shape):
        return {d: i for d, i in self.sharding.devices_indices_map(shape).items() if d in self.devices}


def test_the_rows_of_all_processes_are_the_one_process_batch():
    run_ = train.Run(**{**train.KEYS, **TINY, "gradient_accumulation_steps": 2})
    t = train.Trainer(run_, jax.devices()[:8])  # dp 4, mp 2
    tokens = np.asarray(data.load_tokens("shakespeare:val"))[:8000]
    stream = data.Stream(tokens, run_.seq, run_.seed)
    whole = data.batch_at(tokens, 24, 2 * t.batch, run_.seq, run_.seed).reshape(t.batch_shape)
    parts = []
    for devices in np.asarray(jax.devices()[:8]).reshape(4, 2):  # 4 "processes" of 2 devices: one replica each
        t.rows = shard.local_rows(Subset(t.batch_sharding, devices), t.batch_shape, 1)
        parts.append(t.local_batch(stream, 24))
        assert parts[-1].shape == (2, t.batch // 4, run_.seq + 1)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_clusters_are_detected_from_the_environment_alone():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert runtime.cluster({**slurm, "SLURM_NTASKS": "8"}) == "slurm"
    assert runtime.cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert runtime.cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}) == "open mpi"
    assert runtime.cluster({}) is None  # this machine: a run alone starts nothing


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"], "go together: give all three"),
    (["--coordinator_address", "host", "--num_processes", "2", "--process_id", "0"], "expected HOST:PORT"),
    (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"], "0 <= process_id < num_processes"),
])
def test_bad_process_flags_are_one_line(flags, message, capsys):
    assert train.main(flags + ["--total_steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]

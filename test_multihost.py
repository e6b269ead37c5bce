"""train.py over several processes on loopback, as on the hosts of a pod slice: each process with its own
simulated CPU devices, JAX's distributed runtime between them, gloo for the collectives.

These start real processes and compile in each: they are few and tiny, every wait has a deadline, and every
process started is killed, with its children, when its test ends (`launched`)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest

import ckpt
import ckpt_io
import config
import data
import runtime
import sample
import shard
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(layers=2, d_model=32, n_heads=4, pe_rotary_dims=4, n_vocab=50304, seq=16, per_replica_batch=2,
            cores_per_replica=2, warmup_steps=2, anneal_steps=10, lr=3e-3, end_lr=3e-4, total_steps=4, val_every=2,
            val_batches=2, ckpt_every=2, log_every=1, sample_tokens=0)
HEARTBEAT_S = 5  # how long a lost peer goes unnoticed, here; the default is runtime.HEARTBEAT_S


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
    """A folder for this module's runs, holding a config that names the corpus: every process reads the same
    files. (The corpus folder is the whole session's: nothing is written there.)"""
    folder = tmp_path_factory.mktemp("multihost")
    config = {**TINY, "train_set": str(corpus / "train.tokens"), "val_set": str(corpus / "val.tokens")}
    with open(folder / "tiny.json", "w") as f:
        json.dump(config, f)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(setup, model_dir, processes: int, devices: int, extra=(), per_process=None):
    """Start `processes` train.py processes of one run, `devices` simulated CPU devices each; however the block
    is left, each is killed with any children it started (each leads its own process group), so that a failed
    assertion leaves nothing running. (They share the session's compilation cache, conftest.py's: the same
    programs in every launch are compiled once.) Their output goes to files, not pipes: a process that writes
    more than a pipe holds while the test polls would block, and a failure's message can read the files."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PYTHONUNBUFFERED": "1"}
    port, procs = free_port(), []
    logs = tempfile.mkdtemp(prefix=f"{os.path.basename(model_dir)}-logs-", dir=setup)
    try:
        for i in range(processes):
            args = [sys.executable, os.path.join(HERE, "train.py"), "--config", str(setup / "tiny.json"),
                    "--model_dir", str(model_dir), *extra, *(per_process(i) if per_process else ())]
            if processes > 1:
                args += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                         "--process_id", str(i), "--heartbeat_timeout_seconds", str(HEARTBEAT_S)]
            stem = os.path.join(logs, str(i))
            with open(stem + ".out", "w") as out, open(stem + ".err", "w") as err:
                procs.append(subprocess.Popen(args, env=env, cwd=HERE, stdout=out, stderr=err,
                                              start_new_session=True))
            procs[-1].out, procs[-1].err = stem + ".out", stem + ".err"
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # the group is gone: the process and any children
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # never hide the failure that got us here
                p.wait(10)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def tails(procs, chars=3000) -> str:
    """For a failure's message: each process's exit code (None: still running) and the end of its stderr."""
    return "\n".join(f"--- process {i}, exit code {p.poll()}, the end of its stderr:\n{read(p.err)[-chars:]}"
                     for i, p in enumerate(procs))


def finish(procs, timeout=240):
    """Wait for every process to exit, `timeout` seconds for all of them -> [(exit code, stdout, stderr)]."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{tails(procs)}") from None
    return [(p.returncode, read(p.out), read(p.err)) for p in procs]


def wait_until(condition, procs, what: str, timeout=200):
    """Poll `condition` until it holds; fail if a process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        exited = any(p.poll() is not None for p in procs)
        assert not exited and time.monotonic() < deadline, \
            f"waiting for {what}: {'a process exited' if exited else f'not after {timeout} s'}\n{tails(procs)}"
        time.sleep(0.2)


def run(setup, model_dir, processes, devices, extra=(), **kw):
    """A launch that must succeed -> [(exit code, stdout, stderr)]."""
    with launched(setup, model_dir, processes, devices, extra, **kw) as procs:
        results = finish(procs)
        assert all(rc == 0 for rc, _, _ in results), tails(procs)
    return results


def error_line(stderr, text):
    """train.py's one-line error holding `text` (JAX and gloo may log around it)."""
    return any(line.startswith("error: ") and text in line for line in stderr.splitlines())


def leaves(model_dir):
    return {k: np.asarray(v) for k, v in ckpt_io.flat(ckpt.load(ckpt.latest(model_dir))).items()}


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


def test_two_processes_with_fsdp_train_as_one_without(setup, references):
    """FSDP and sequence parallelism over 2 processes of 4 devices (dp 4 x mp 2: every weight split across the
    processes) train as the 1-process run without them: the same losses and weights, to the rounding of sums in
    another order (each leaf to 1e-5 of its norm)."""
    one, _, _ = references
    split = setup / "fsdp"
    run(setup, split, 2, 4, ["--fsdp", "true", "--sequence_parallel", "true"])
    assert ckpt.read_meta(ckpt.latest(split))["run"]["fsdp"] is True
    np.testing.assert_allclose(losses(split), losses(one), rtol=1e-5)
    a, b = leaves(split), leaves(one)
    assert a.keys() == b.keys()
    for k in b:
        assert np.linalg.norm(a[k].astype(np.float64) - b[k]) <= 1e-5 * np.linalg.norm(b[k].astype(np.float64)), k


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bit_identical(setup, references):
    _, two, _ = references
    cut = setup / "cut"
    with launched(setup, cut, 2, 4, ["--total_steps", "40", "--ckpt_every", "0", "--val_every", "0"]) as procs:
        metrics = cut / "metrics.jsonl"
        wait_until(lambda: os.path.exists(metrics) and len(read(metrics).splitlines()) >= 2, procs, "2 steps logged")
        procs[1].send_signal(signal.SIGTERM)  # to process 1 only: process 0 learns of it through the next step
        results = finish(procs)
        assert [rc for rc, _, _ in results] == [0, 0], tails(procs)
        stopped = ckpt.read_meta(ckpt.latest(cut))["step"]
        assert 2 <= stopped < 40 and "stopped by a signal" in results[0][2], tails(procs)
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
    # The two runs at once: they are independent, and much of a launch is waiting (processes starting, joining
    # the coordinator, gloo connecting), which the other run's work fills. Both hit the cache for every program.
    with (launched(setup, setup / "fine-tuned", 2, 4, ["--init_from", str(one), "--total_steps", "1",
                                                       "--val_batches", "0"]) as tuned,
          launched(setup, setup / "bench", 2, 4, ["--benchmark", "--benchmark_steps", "1"]) as bench):
        (rc0, out0, err0), (rc1, _, _) = finish(tuned)
        assert rc0 == rc1 == 0 and "initialised from" in err0 and "step 1/1" in out0, tails(tuned)
        (rc0, out0, _), (rc1, out1, _) = finish(bench)
        assert rc0 == rc1 == 0, tails(bench)
    record = json.loads(out0.strip().splitlines()[-1])
    assert record["devices"] == 8 and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
    assert '"tokens_per_s"' not in out1  # process 0 reports


def test_a_killed_peer_ends_the_survivor_within_the_heartbeat(setup):
    killed = setup / "killed"
    with launched(setup, killed, 2, 4, ["--total_steps", "1000", "--ckpt_every", "0", "--val_every", "0"]) as procs:
        wait_until(lambda: os.path.exists(killed / "metrics.jsonl"), procs, "a step logged")
        procs[1].kill()
        (rc, _, _), = finish(procs[:1], timeout=6 * HEARTBEAT_S)  # fails, with its stderr, if it outlives that
        assert rc != 0, tails(procs[:1])


def test_an_error_one_process_sees_ends_both_with_its_message(setup):
    missing = str(setup / "not-on-this-host.tokens")
    with launched(setup, setup / "missing", 2, 4,
                  per_process=lambda i: ["--train_set", missing] if i == 1 else []) as procs:
        results = finish(procs, timeout=60)  # not the 5-minute shutdown barrier
        assert [rc for rc, _, _ in results] == [1, 1], tails(procs)
        assert error_line(results[1][2], "not-on-this-host.tokens"), tails(procs)
        assert "process 1 failed" in results[0][2] and "not-on-this-host.tokens" in results[0][2], tails(procs)


def test_a_bad_token_in_one_process_rows_ends_both(setup, corpus):
    """A token id past n_vocab in a window that only process 1 builds, at step 3: both stop there, and the
    checkpoint of step 2 is the newest."""
    tokens = np.fromfile(corpus / "train.tokens", data.TOKEN_DTYPE).copy()
    order = data.Stream(tokens, TINY["seq"], 0).order(0)
    batch = 4 * TINY["per_replica_batch"]  # dp 4
    window = int(order[3 * batch - 1])  # step 3's last row: process 1's
    tokens[window * TINY["seq"] + 3] = 60000
    tokens.tofile(setup / "bad.tokens")
    with launched(setup, setup / "bad", 2, 4, ["--train_set", str(setup / "bad.tokens")]) as procs:
        results = finish(procs)
        assert [rc for rc, _, _ in results] == [1, 1], tails(procs)
        assert error_line(results[1][2], "60000") and error_line(results[0][2], "process 1 failed"), tails(procs)
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


class TpuCore(NamedTuple):
    id: int
    process_index: int
    platform: str = "tpu"


def test_on_a_tpu_slice_a_model_replica_may_span_whole_hosts():
    """ICI links a slice's hosts: cores_per_replica 16 on v3 hosts of 8 cores takes two whole hosts a replica,
    but 12 would split a host between replicas."""
    cores = [TpuCore(8 * p + i, p) for p in range(4) for i in range(8)]
    assert shard.host_order(cores, 16) == cores and shard.host_order(cores, 32) == cores
    with pytest.raises(ValueError, match="cores_per_replica=12 does not divide"):
        shard.host_order(cores, 12)
    with pytest.raises(ValueError, match="cores_per_replica=12 cannot be placed: process 0 has 8 devices"):
        shard.host_order(cores[:24], 12)


class Subset:
    """A sharding seen from a process that holds only some of its devices."""

    def __init__(self, sharding, devices):
        self.sharding, self.devices = sharding, set(devices)

    def addressable_devices_indices_map(self, shape):
        return {d: i for d, i in self.sharding.devices_indices_map(shape).items() if d in self.devices}


def test_the_rows_of_all_processes_are_the_one_process_batch():
    run_ = config.Run(**{**config.KEYS, **TINY, "gradient_accumulation_steps": 2})
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

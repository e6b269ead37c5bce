"""bench/accelerator.sh end to end at tiny sizes on the CPU: every figure it promises, as JSON lines; and the load
probe, whose figures must agree with one another."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": ""}  # one CPU device: what a GPU host has


def kill_group(p):
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing of it is left running
        os.killpg(p.pid, signal.SIGKILL)


def run(args, timeout=240) -> subprocess.CompletedProcess:
    """Run `args` in a process group of its own, and kill the whole group however this ends: the processes the
    script or the probe starts (the benchmarks, the server) must not outlive the test. The timeout is below
    pytest.ini's, so that a hang fails here, with what the command said."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
            out, err = p.communicate(timeout=30)
            raise AssertionError(f"{' '.join(args[:2])} still running after {timeout} s:\n{err[-3000:]}") from None
        finally:
            kill_group(p)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def test_accelerator_script_prints_every_figure():
    res = run(["bash", os.path.join(ROOT, "bench", "accelerator.sh"), "--tiny"])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["figure"] for r in lines] == ["train", "train_lora", "decode_b1", "decode_b8"]
    train, train_lora, b1, b8 = lines
    for r in (train, train_lora):
        assert "train.py --benchmark" in r["command"] and 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
        assert r["devices"] == 1
    assert "--config configs/6B_lora_1gpu.json" in train_lora["command"]
    assert (b1["batch"], b8["batch"]) == (1, 8)
    for r in (b1, b8):
        assert r["decode_tokens_per_s"] > 0 and r["decode_bound_tokens_per_s"] > 0
        assert r["stream_ms_per_token"] > 0 and r["loop_ms_per_token"] > 0
    # The tiny runs compute in bf16, as the device runs do: the flags say so (the LoRA config, by its "dtype"), and
    # the records say what the programs ran with.
    assert "--dtype bfloat16" in train["command"] and all("--dtype bfloat16" in r["command"] for r in (b1, b8))
    assert [r["dtype"] for r in lines] == ["bfloat16"] * 4
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", r["date"]) and r["device"] == "cpu" for r in lines)
    bad = run(["bash", os.path.join(ROOT, "bench", "accelerator.sh"), "--huge"], timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


def quotient_bounds(a, b, half):
    """The range of x / y for the true x, y of `a` and `b`, each rounded to within `half`."""
    return (a - half) / (b + half), (a + half) / (b - half)


def test_load_probe_reports_the_server_under_load_against_a_request_alone():
    # --lazy_compile: what is tested is the probe, not the server's start-up (test_sample's and test_serve's), and
    # the probe's warm-up meets the shapes its measured rounds need.
    res = run([sys.executable, os.path.join(ROOT, "bench", "load.py"), "--preset", "tiny", "--requests", "4",
               "--max_tokens", "6", "--interval", "0.005", "--lazy_compile"])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["requests"] == 4 and got["max_tokens"] == 6
    for k in ("ttft_p50_s", "ttft_p90_s", "ttft_alone_s", "latency_p50_s", "latency_alone_s", "tokens_per_s",
              "one_stream_tokens_per_s", "ttft_p90_vs_alone", "latency_p50_vs_alone", "throughput_vs_one_stream"):
        assert got[k] > 0, k
    assert got["ttft_alone_s"] < got["latency_alone_s"]
    # Every request decodes exactly max_tokens (the end-of-text token is biased away): then one stream's tokens/s,
    # the median over the requests alone, is max_tokens over their median latency. (Times are printed to 4
    # decimals.)
    low, high = quotient_bounds(got["max_tokens"], got["latency_alone_s"], 5e-5)
    assert low - 5e-5 <= got["one_stream_tokens_per_s"] <= high + 5e-5, got
    # Each ratio is the quotient of the figures it names (they to 4 decimals, it to 2) ...
    for ratio, (num, den) in {"ttft_p90_vs_alone": ("ttft_p90_s", "ttft_alone_s"),
                              "latency_p50_vs_alone": ("latency_p50_s", "latency_alone_s"),
                              "throughput_vs_one_stream": ("tokens_per_s", "one_stream_tokens_per_s")}.items():
        low, high = quotient_bounds(got[num], got[den], 5e-5)
        assert low - 0.005 <= got[ratio] <= high + 0.005, (ratio, got)
    # ... and goals_met is what the printed ratios say against the documented goals (load.py's docstring, the
    # serving table, docs/serving.md): first token p90 at most 10x a request alone's, latency p50 at most 4x (on a
    # CPU, the default; 3x on an accelerator, --latency_goal 3), throughput at least 2x one stream's.
    assert got["latency_goal"] == 4
    assert got["goals_met"] == (got["ttft_p90_vs_alone"] <= 10 and got["latency_p50_vs_alone"] <= 4
                                and got["throughput_vs_one_stream"] >= 2), got
    assert (got["cpu_stolen"] is None) == (not os.path.exists("/proc/stat")), got  # read from Linux's /proc/stat
    assert got["cpu_stolen"] is None or 0 <= got["cpu_stolen"] < 1


def test_step_probe_reports_each_batch_size_against_the_first():
    res = run([sys.executable, os.path.join(ROOT, "bench", "step.py"), "--preset", "tiny", "--rows", "1", "3",
               "--slots", "64", "--k", "4", "--calls", "2", "--dtype", "bfloat16"])  # float32: the same, uncast
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["dtype"] == "bfloat16"
    assert set(got["ms_per_step"]) == set(got["vs_first"]) == {"1", "3"} and got["vs_first"]["1"] == 1
    for m in got["ms_per_step"].values():
        assert 0 < m["best"] <= m["median"]
    best = {b: m["best"] for b, m in got["ms_per_step"].items()}
    low, high = quotient_bounds(best["3"], best["1"], 5e-4)  # times printed to 3 decimals, the ratio to 2
    assert low - 0.005 <= got["vs_first"]["3"] <= high + 0.005, got
    # The output projection alone at each size, and the machine's matmul rate: the ratio's floor.
    assert set(got["head_ms"]) == {"1", "3"} and all(t > 0 for t in got["head_ms"].values())
    assert got["matmul_gflops"] > 0
    # Calls that would overrun the cache: a one-line error, before anything is compiled.
    bad = run([sys.executable, os.path.join(ROOT, "bench", "step.py"), "--preset", "tiny", "--slots", "32"], timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: ") and "--calls" in bad.stderr

"""bench/accelerator.sh end to end at tiny sizes on the CPU: every figure it promises, as JSON lines."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def test_accelerator_script_prints_every_figure():
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "accelerator.sh"), "--tiny"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable,
                                                      "XLA_FLAGS": ""})  # one CPU device: what a GPU host has
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["figure"] for r in lines] == ["train", "train_lora", "decode_b1", "decode_b8"]
    train, train_lora, b1, b8 = lines
    for r in (train, train_lora):
        assert "train.py --benchmark" in r["command"] and 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
    assert "--lora_rank" in train_lora["command"]
    assert (b1["batch"], b8["batch"]) == (1, 8)
    for r in (b1, b8):
        assert r["decode_tokens_per_s"] > 0 and r["decode_bound_tokens_per_s"] > 0
        assert r["stream_ms_per_token"] > 0 and r["loop_ms_per_token"] > 0
    assert all(r["date"] and r["device"] for r in lines)
    bad = subprocess.run(["bash", os.path.join(ROOT, "bench", "accelerator.sh"), "--huge"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_load_probe_reports_the_server_under_load_against_a_request_alone():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "load.py"), "--preset", "tiny", "--requests", "4",
                          "--max_tokens", "6", "--interval", "0.005"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["requests"] == 4 and got["max_tokens"] == 6 and isinstance(got["goals_met"], bool)
    for k in ("ttft_p50_s", "ttft_p90_s", "ttft_alone_s", "latency_p50_s", "latency_alone_s", "tokens_per_s",
              "one_stream_tokens_per_s", "ttft_p90_vs_alone", "latency_p50_vs_alone", "throughput_vs_one_stream"):
        assert got[k] > 0, k
    assert got["ttft_p50_s"] <= got["ttft_p90_s"] and got["ttft_alone_s"] < got["latency_alone_s"]
    assert got["cpu_stolen"] is None or 0 <= got["cpu_stolen"] < 1

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

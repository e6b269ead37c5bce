"""sample.py, the command line: generation in prompt order, streaming, stdin, scoring, the benchmark, errors
as one line, and --serve under SIGTERM."""
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import jax
import pytest

import ckpt
import sample
import score


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def checkpoint(cfg, params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    ckpt.save(path, {"params": params}, cfg)
    return str(path)


def cli(capsys, *argv, stdin=None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = sample.main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_in_prompt_order(enc, prompts, capsys, checkpoint, params, reference):
    texts = [enc.decode(p) for p in prompts]
    argv = ["--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--json"]
    code, out, _ = cli(capsys, *argv, *[a for t in texts for a in ("--prompt", t)])
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [x["prompt"] for x in lines] == texts
    assert [x["completion_ids"] for x in lines] == reference
    assert [x["completion"] for x in lines] == [enc.decode(r) for r in reference]
    code, out, _ = cli(capsys, *argv, "--mesh", "2,2", "--num_samples", "3", "--prompt", texts[0])
    assert [json.loads(x)["completion_ids"] for x in out.splitlines()] == [reference[0]] * 3


def test_cli_streams_one_sample_and_reads_stdin(enc, prompts, capsys, checkpoint, reference):
    prompt = enc.decode(prompts[1])
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--prompt", prompt)
    assert code == 0 and out == prompt + enc.decode(reference[1]) + "\n"
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--greedy", "--max_new_tokens", "10", "--json",
                       stdin=f"{prompt}\n\n{enc.decode(prompts[0])}\n")
    assert [json.loads(x)["completion_ids"] for x in out.splitlines()] == [reference[1], reference[0]]


def test_cli_score_and_lambada(cfg, enc, text, lambada_texts, direct_lambada, capsys, checkpoint, params, layered,
                               tmp_path):
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada_texts))
    code, out, _ = cli(capsys, "--checkpoint", checkpoint, "--score", str(tmp_path / "t.txt"), "--batch_size", "8")
    want = score.score_text(layered, cfg, text, enc)
    assert code == 0 and json.loads(out)["nll"] == pytest.approx(want["nll"], rel=1e-6)
    argv = ["--checkpoint", checkpoint, "--lambada", str(tmp_path / "l.jsonl"), "--mesh", "2,2", "--batch_size", "8"]
    code, out, _ = cli(capsys, *argv)
    got, want = json.loads(out), direct_lambada(params, lambada_texts)
    assert code == 0 and got["acc"] == want["acc"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent", "--prompt", "x"], "no such checkpoint"),
    (["--mesh", "a,b", "--prompt", "x"], "must be DP,MP"),
    (["--mesh", "1,3", "--prompt", "x"], "not divisible by mp=3"),
    (["--prompt", "x " * 70], "exceeds the context of 64"),
    (["--top_p", "0", "--prompt", "x"], "--top_p"),
])
def test_cli_errors_are_one_line(capsys, checkpoint, argv, message):
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", checkpoint] + argv
    code, out, err = cli(capsys, *argv)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_bad_prompt_files_and_port(capsys, checkpoint, tmp_path):
    (tmp_path / "keyless.jsonl").write_text('{"foo": 1}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    for argv, message in [(["--prompt_file", str(tmp_path / "keyless.jsonl")], "string 'prompt'"),
                          (["--prompt_file", str(tmp_path / "empty.jsonl")], "no prompts"),
                          (["--serve", "--port", "70000"], "--port must be in 0..65535")]:
        code, out, err = cli(capsys, "--checkpoint", checkpoint, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_without_checkpoint_says_how_to_make_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "--prompt", "x")
    assert code == 1 and "python train.py" in err


def test_benchmark_reports_speed_and_the_bound(cfg, layered):
    got = sample.benchmark(layered, cfg, 2, 8)
    assert got["weights_bytes"] == sum(x.nbytes for x in jax.tree.leaves(layered)) - layered["wte"].nbytes
    assert all(got[k] > 0 for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s",
                                    "compile_s", "bandwidth_bytes_per_s", "decode_bound_tokens_per_s",
                                    "loop_ms_per_token", "stream_ms_per_token"))
    with pytest.raises(ValueError, match="64 new tokens leave no room for a prompt in the context of 64"):
        sample.benchmark(layered, cfg, 2, 64)


def cli_server(checkpoint, patience, *argv):
    """Run `sample.py --serve` until it says where it serves -> (the process, its port, what it said before that
    line); its stderr is read on a thread, so that waiting for a line has a deadline and the pipe never fills."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", checkpoint, "--serve", "--port", "0", *argv],
                            cwd=os.path.dirname(os.path.abspath(__file__)), env=env, stderr=subprocess.PIPE, text=True)
    lines, said = queue.Queue(), []

    def read():
        for x in proc.stderr:
            lines.put(x)
        lines.put("")  # stderr closed

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    while True:
        try:
            line = lines.get(timeout=patience)
        except queue.Empty:
            raise AssertionError(f"sample.py --serve said only {said} in {patience:.0f} s") from None
        assert line, f"sample.py --serve exited with {proc.wait()}, saying {said}"
        if "serving http://127.0.0.1:" in line:
            return proc, int(line.split(":")[2].split("/")[0]), said
        said.append(line)


def stop_cli_server(proc, patience):
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=patience) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.reader.join(patience)
        proc.stderr.close()


def test_sigterm_stops_the_cli_server(checkpoint, patience):
    proc, port, _ = cli_server(checkpoint, patience, "--lazy_compile")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=patience) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=patience) as r:
            assert json.load(r)["data"][0]["id"] == "ckpt0"  # the run folder of the step_ folder it serves
    finally:
        stop_cli_server(proc, patience)


def test_the_cli_server_compiles_before_serving_and_a_restart_reads_the_cache(checkpoint, patience, tmp_path):
    """--serve compiles every shape before it says it serves, saying how long that took; the programs go into
    --compile_cache, from which a second start reads them back, faster."""
    cache, took = tmp_path / "xla", []
    for _ in range(2):
        proc, port, said = cli_server(checkpoint, patience, "--batch_size", "1", "--compile_cache", str(cache))
        try:
            assert any(line.startswith("compiling: ") for line in said), said
            [line] = [line for line in said if line.startswith("compiled every shape in ")]
            took.append(float(line.split()[4]))
            assert str(cache) in line and any(cache.iterdir())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=patience) as r:
                assert json.load(r) == {"status": "ok"}
        finally:
            stop_cli_server(proc, patience)
    assert took[1] < took[0], took

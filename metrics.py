"""What a training run reports: a line per logged step on the terminal, the same record in
<model_dir>/metrics.jsonl and, with wandb_project set, in Weights & Biases; notes from process 0 alone."""
import dataclasses
import json
import math
import os
import secrets
import sys
import time

import jax

import ckpt
import perf
import runtime
import shard
from config import ConfigError, Run


class MetricsLog:
    """Where each metrics record goes besides the terminal: <model_dir>/metrics.jsonl, and a Weights & Biases run
    when wandb_project is set and wandb is installed (only process 0 logs). The W&B run's id is kept in
    <model_dir>/wandb_id, so that a resumed training run continues the same W&B run."""

    def __init__(self, run: Run):
        self.path, self.wandb = os.path.join(run.model_dir, "metrics.jsonl"), None
        if not run.wandb_project or jax.process_index() != 0:
            return
        try:
            import wandb
        except ImportError:
            print(f"note: wandb_project={run.wandb_project!r} but wandb is not installed (pip install wandb): "
                  "logging to metrics.jsonl only", file=sys.stderr)
            return
        id_file = os.path.join(run.model_dir, "wandb_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(6)
        try:
            self.wandb = wandb.init(project=run.wandb_project, name=run.name, id=run_id, resume="allow",
                                    config=dataclasses.asdict(run),
                                    dir=None if os.environ.get("WANDB_DIR") else run.model_dir)
        except Exception as e:  # wandb's own errors (no login, no network) have no common base class
            raise ConfigError(f"wandb could not start a run ({e}): `wandb login`, or WANDB_MODE=offline") from None
        with open(id_file, "w") as f:
            f.write(run_id + "\n")

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self, failed: bool):
        if self.wandb is not None:
            self.wandb.finish(exit_code=int(failed))


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def note(message: str):
    """Progress and notes come from process 0 alone."""
    if runtime.is_main():
        print(message, file=sys.stderr, flush=True)


class Progress:
    """Times the steps of `t` (a train.Trainer) and turns a step's metrics into a record: printed and logged by
    process 0. Raises on a non-finite loss (every process sees the same loss, so all of them stop there)."""

    def __init__(self, run: Run, t, step: int, train_tokens: int):
        self.run, self.t, self.log = run, t, MetricsLog(run)
        self.peak = perf.device_peak(t.device, t.cfg.dtype) * t.mesh.size
        self.peak_read = time.perf_counter()
        self.fpt = t.flops_per_token()
        self.tick, self.tick_step = time.perf_counter(), step
        note(f"{run.name}: {t.cfg.n_params() / 1e6:.1f}M params, mesh dp={t.dp} mp={t.mesh.shape[shard.MP]}, "
             f"{jax.process_count()} process(es), {t.tokens_per_step()} tokens/step, {train_tokens} training tokens")

    def __call__(self, step: int, metrics: dict, validate) -> dict:
        m = {k: float(v) for k, v in metrics.items() if k != "halt"}
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"loss is {m['loss']} at step {step}: lower lr or check the data; "
                                     f"the last good checkpoint is {ckpt.latest(self.run.model_dir)}")
        now = time.perf_counter()
        tps = (step - self.tick_step) * self.t.tokens_per_step() / (now - self.tick)
        if self.t.device.platform == "cpu" and now - self.peak_read > 60:
            # Read again each minute and the highest kept: on a shared CPU one reading can be a third low, which
            # would inflate mfu. A few matmuls, outside the timed steps.
            reading = perf.matmul_peak(self.t.device, self.t.cfg.dtype, readings=1)
            self.peak = max(self.peak, reading * self.t.mesh.size)
            self.peak_read = time.perf_counter()
        record = {"step": step, **m, "tokens_per_s": tps, "mfu": tps * self.fpt / self.peak, **validate()}
        eta = (self.run.total_steps - step) * (now - self.tick) / (step - self.tick_step)
        if runtime.is_main():
            print(f"step {step}/{self.run.total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | {tps:,.0f} tok/s | "
                  f"mfu {record['mfu']:.2f} | eta {fmt_time(eta)}"
                  + "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_loss")), flush=True)
            self.log.write(record)
        self.tick, self.tick_step = time.perf_counter(), step
        return record

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.log.close(failed=kind is not None)

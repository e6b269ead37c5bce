"""`train.py --plan`: the real training step compiled ahead of time for devices this machine need not have, and
its per-device memory, without allocating it. With libtpu installed (it works on a machine without TPUs) the TPU
compiler plans for a TPU topology; otherwise XLA:CPU plans for simulated CPU devices (docs/training.md).

    devices, topology = plan_devices(run)                        # before anything starts JAX's backends
    status = report(plan(train.Trainer(run, devices), topology))  # prints the JSON line; 1: it does not fit
"""
import contextlib
import importlib.util
import json
import math
import re
import sys

import jax

import shard
from config import ConfigError, Run

# Each core's HBM, for the plan's verdict; the TPU compiler itself refuses a step that does not fit its core.
HBM_BYTES = {"TPU v2": 8 * 2**30, "TPU v3": 16 * 2**30, "TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30,
             "TPU v5": 95 * 2**30, "TPU v6 lite": 32 * 2**30}


def _bytes(text: str) -> int:
    """'15.48G' (an XLA memory figure) -> bytes."""
    return round(float(text[:-1]) * 1024 ** " KMGT".index(text[-1]))


def plan(t, topology: str | None = None, device_bytes: int | None = None) -> dict:
    """Compile the step of `t` (a train.Trainer on the planned devices) on abstract shapes; per-device memory
    without allocating, and whether it fits `device_bytes` a device (default: the HBM of the TPU planned for, or
    of tpu_size's v3 cores). A step that the TPU compiler finds too big is an answer too: "fits" false, with the
    bytes it needed."""
    def per_device(tree):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    params, opt, frozen = (per_device(t.shapes["params"]), per_device(t.shapes["opt_state"]),
                           per_device(t.frozen_shapes))
    kind = t.device.device_kind
    if device_bytes is None:
        device_bytes = HBM_BYTES.get(kind if t.device.platform == "tpu" else "TPU v3" if t.run.tpu_size > 1 else "")
    out = {"devices": t.mesh.size, "platform": t.device.platform, "device_kind": kind, "topology": topology,
           "dtype": t.cfg.dtype, "remat": t.cfg.remat, "mesh": {shard.DP: t.dp, shard.MP: t.mesh.shape[shard.MP]},
           "n_params": t.cfg.n_params(), "params_bytes": params, "opt_state_bytes": opt, "frozen_bytes": frozen,
           "flops_per_step": t.flops_per_token() * t.tokens_per_step()}
    try:
        temp = int(t.lower().compile().memory_analysis().temp_size_in_bytes)
    except jax.errors.JaxRuntimeError as e:
        message = str(e).splitlines()[0]
        figures = re.findall(r"\(([\d.]+[KMGT])\)", message)  # "...temporaries (19.91G) exceeds available HBM (15.48G)"
        if "RESOURCE_EXHAUSTED" not in message or len(figures) < 2:
            raise ConfigError(f"the compiler refused the step: {message}") from None
        return out | {"fits": False, "needed_bytes": _bytes(figures[0]), "available_bytes": _bytes(figures[-1]),
                      "compiler": message}
    total = params + opt + frozen + temp
    return out | {"fits": None if device_bytes is None else total <= device_bytes, "temp_bytes": temp,
                  "total_bytes": total, "available_bytes": device_bytes}


def report(out: dict) -> int:
    """Print a plan's JSON line, and on stderr what it cannot say; the exit status: 1 where the step does not fit."""
    print(json.dumps(out))
    if out["platform"] == "cpu" and out["dtype"] != "float32":
        print("note: XLA:CPU computes bf16 and fp16 matmuls in fp32 (and may hold fp32 copies of whole bf16 "
              "weight stacks): temp_bytes can differ from an accelerator's; --topology plans with the TPU "
              "compiler", file=sys.stderr)
    if out["fits"] is False:
        need = (f"the compiler's {out['needed_bytes'] / 2**30:.2f} GiB of temporaries" if "needed_bytes" in out
                else f"{out['total_bytes'] / 2**30:.2f} GiB")
        print(f"error: the step does not fit: {need} a device, {out['available_bytes'] / 2**30:.2f} GiB "
              f"available; lower per_replica_batch, raise cores_per_replica, or set remat true", file=sys.stderr)
        return 1
    return 0


def v3_topology(tpu_size: int) -> str:
    """The original's tpu_size, a TPU v3-N (N cores, two a chip), as a topology name: v3-8 -> v3:2x2,
    v3-256 -> v3:8x16."""
    chips = tpu_size // 2
    if tpu_size < 2 or chips & (chips - 1):
        raise ConfigError(f"tpu_size={tpu_size}: a TPU v3 slice has 2^k cores (8, 32, 256...); --topology names others")
    a = 2 ** (chips.bit_length() // 2)  # the shorter side
    return f"v3:{min(a, chips // a)}x{max(a, chips // a)}"


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology, by libtpu, with no TPU needed."""
    try:
        from jax.experimental import topologies
        dims = [int(d) for d in topology.split(":")[1].split("x")]
        # One host holds up to 2x2x1 chips; a smaller slice is all on one host.
        bounds = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 chips_per_host_bounds=bounds).devices)
    except (ValueError, IndexError):
        raise ConfigError(f"--topology {topology!r}: expected NAME:AxB or NAME:AxBxC, such as v5e:1x1 or v4:2x2x1")
    except Exception as e:  # no libtpu, or a topology it does not know; its errors have no common base
        raise ConfigError(f"--topology {topology}: {str(e).splitlines()[0]} (needs libtpu: pip install "
                          f"'jax[tpu]', which plans on a machine without TPUs)") from None


def plan_devices(run: Run, topology=None) -> tuple[list, str | None]:
    """The devices --plan compiles for without owning them, and their topology: a TPU topology's (its compiler's
    own memory analysis; libtpu works on a machine without TPUs), by default the v3-N of tpu_size where libtpu is
    installed, or else simulated CPU devices. Call it before JAX's backends start: it sets the CPU device count."""
    n = max(run.tpu_size or run.cores_per_replica, 1)
    if topology is None and run.tpu_size > 1 and has_libtpu():
        topology = v3_topology(run.tpu_size)
    elif topology:
        n = 0  # a topology named: all of its devices
    if topology:
        devices = tpu_devices(topology)
        if len(devices) < n:
            raise ConfigError(f"--topology {topology} has {len(devices)} devices, the config needs {n}")
        return devices[:n or None], topology
    with contextlib.suppress(RuntimeError):  # raised once JAX's backends have started: then they have what they have
        jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(f"--plan needs {n} devices, and JAX started with {len(devices)}: plan in a fresh process")
    return devices[:n], None

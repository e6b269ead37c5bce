"""Host and process set-up for the programs: JAX's distributed runtime, glibc's malloc, XLA's CPU options.

Many hosts run as one program (JAX's multi-controller model): every process runs the same `python train.py`
and `start` joins it to the others through `jax.distributed.initialize`, whose own collectives (ICI/DCN on
TPUs, NCCL on GPUs, gloo on CPUs) carry the traffic. Cluster managers that JAX detects by itself (a Cloud TPU
VM, Slurm, Open MPI) need no flags; anywhere else the three flags name the coordinator, the process count and
this process's index, as `jax.distributed.initialize` names them.
"""
import contextlib
import ctypes
import glob
import importlib.util
import os
import socket

import jax
import numpy as np

GLIBC = "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {})  # the C library is glibc (not musl, macOS...)
# A peer silent for this long is declared dead and JAX aborts the survivors (exit 134), so that a lost host
# never leaves the others waiting in a collective. Long enough for a busy host's heartbeat thread to get through.
HEARTBEAT_S = 60
MESSAGE_BYTES = 2048  # the room for one process's error message in `agree`


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed memory for reuse rather than hand it back to the kernel; True if it took.

    XLA:CPU allocates a program's buffers afresh on every call and glibc serves big ones with new mmaps,
    so each step faults in and zeroes every 4 KiB page of every temporary again. With one arena, no mmap and
    no trimming, freed buffers are reused: the heap grows over the first steps, then stays at its high-water
    mark, as a framework's caching allocator would. Trimming above a threshold instead still hands large
    blocks back on some steps (docs/performance.md has the figures). Takes effect only before JAX starts its
    threads: call it first in a program. It does nothing where the C library is not glibc.
    """
    if not GLIBC:
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from <malloc.h>; a threshold of -1: never trim
    return all(libc.mallopt(k, v) == 1 for k, v in [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)])


# Collectives overlapped with compute, where FSDP's per-layer all-gathers and reduce-scatters and sequence
# parallel's would otherwise stall the matrix units: on TPUs async collective fusion runs the next layer's gather
# and this layer's reduce-scatter beside the matmuls; on GPUs XLA pipelines a loop's all-gathers and
# reduce-scatters one iteration ahead. (libtpu's further overlap options, multi-step fusion and collectives on the
# TensorCore, ran out of a v3's sync flags compiling the 6B v3-8 step with sequence parallelism: left out.)
OVERLAP = {
    "tpu": {"xla_tpu_enable_async_collective_fusion": True,
            "xla_tpu_enable_async_collective_fusion_fuse_all_gather": True,
            "xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter": True},
    "gpu": {"xla_gpu_enable_pipelined_all_gather": True, "xla_gpu_enable_pipelined_reduce_scatter": True,
            "xla_gpu_enable_pipelined_all_reduce": True},
}


def compiler_options(device) -> dict:
    """XLA options for programs on `device`'s platform: the training step, and the matmul peak MFU divides by.

    On TPUs and GPUs, OVERLAP's. On CPUs: XLA's YNNPACK fusions are turned off, as their reductions over a leading
    axis (the gradient of every bias and LayerNorm) run on one core, far slower than XLA's own, and XLA's own
    matmuls are faster too (docs/performance.md has the figures). And max/min need not propagate NaNs: the
    step's maxima are the softmax stabilisers, and a NaN in the logits reaches the loss through the exponentials
    anyway, where training stops on it.
    """
    if device.platform != "cpu":
        return dict(OVERLAP.get("gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform, {}))
    return {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_enable_fast_min_max": True}


# ---------------------------------------------------------------- many processes

def cluster(env=os.environ) -> str | None:
    """The cluster manager that `jax.distributed.initialize()` would detect, told from the environment alone
    (nothing is asked of the network, so a run on one host starts at once); None on a plain machine."""
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")):
        if int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open mpi"
    # A Cloud TPU VM: libtpu beside TPU chips. JAX asks the VM's metadata server how many workers there are.
    tpu_chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    if (tpu_chips or env.get("TPU_WORKER_HOSTNAMES")) and importlib.util.find_spec("libtpu") is not None:
        return "cloud tpu"
    return None


def start(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
          heartbeat_timeout_seconds: int = HEARTBEAT_S) -> int:
    """Join this process to the others of its run, if there are any; returns the number of processes.

    With none of the three arguments, a detected cluster (see `cluster`) is joined the way JAX detects it, and
    a plain machine runs alone. Call it before anything else touches JAX's devices."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together: give all three "
                             "(or none, where JAX detects the cluster)")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator_address {coordinator_address!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} with --num_processes {num_processes}: need "
                             f"0 <= process_id < num_processes")
        if num_processes == 1:
            return 1
    elif cluster() is None:
        return 1
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return jax.process_count()


def is_main() -> bool:
    """Process 0 prints progress and writes the run's logs; every process prints its own errors."""
    return jax.process_index() == 0


def _allgather_bytes(data: bytes, size: int) -> list[bytes]:
    """Every process's `data` (at most `size` bytes), in process order; one small collective."""
    from jax.experimental import multihost_utils
    buf = np.zeros(size + 4, np.uint8)
    buf[:4] = np.frombuffer(len(data).to_bytes(4, "little"), np.uint8)
    buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [bytes(r[4:4 + int.from_bytes(bytes(r[:4]), "little")]) for r in rows]


def hosts() -> dict[int, str]:
    """{process index: host name} for every process: model parallelism is placed within a host (Slurm on GPUs
    runs a process per GPU, so a host can hold several)."""
    if jax.process_count() == 1:
        return {jax.process_index(): socket.gethostname()}
    names = _allgather_bytes(socket.gethostname().encode()[:255], 255)
    return {i: n.decode() for i, n in enumerate(names)}


class PeerError(ValueError):
    """Another process of the run failed; its message is ours."""


def agree(error: BaseException | None):
    """Every process calls this at the same point: if any of them brings an error, all of them raise, the
    processes that failed their own error and the others a PeerError with the first failure's message, so
    that a fault only one host sees (a missing file, a bad token in its rows) ends the run everywhere at once
    rather than leaving the others in the next collective until the heartbeat gives up on them."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    text = b"" if error is None else (f"{error}".encode()[:MESSAGE_BYTES - 1] or b"?")
    texts = _allgather_bytes(text, MESSAGE_BYTES)
    if error is not None:
        raise error
    failed = [(i, t.decode(errors="replace")) for i, t in enumerate(texts) if t]
    if failed:
        i, message = failed[0]
        raise PeerError(f"process {i} failed: {message}")


@contextlib.contextmanager
def agreed():
    """A block of set-up that may fail on one process alone (a file missing on its host): its errors are agreed
    on at the end of the block (see `agree`). It must hold no collectives of its own, which a failed process
    would never join."""
    try:
        yield
    except Exception as e:
        agree(e)
        raise
    agree(None)

"""runtime.py: glibc keeps the host memory that JAX frees, so that a step does not fault its buffers in again."""
import os
import subprocess
import sys

import pytest

import runtime

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.sysconf("SC_PAGE_SIZE")
# Each test runs its code in a fresh process: glibc's settings only take before JAX starts its threads. The counts
# are minor page faults, and a kernel whose transparent huge pages are `[always]` serves a big buffer with 2 MiB pages,
# one fault each: a buffer faulted in again on every call would then count 512 times fewer faults, too few to tell
# from one that is reused. So the process turns huge pages off for itself first (prctl PR_SET_THP_DISABLE).
PRELUDE = """if 1:
    import ctypes, resource
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    assert libc.prctl(41, 1, 0, 0, 0) == 0, ("PR_SET_THP_DISABLE", ctypes.get_errno())
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    import runtime
"""


def run(code):
    res = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, cwd=HERE)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(not runtime.GLIBC, reason="glibc only")
@pytest.mark.parametrize("keep", [False, True])
def test_freed_host_memory_is_reused_not_faulted_in_again(keep):
    # A loop like training's: every call's program writes a fresh 64 MiB buffer (above the 32 MiB up to which glibc's
    # mmap threshold adapts, so without the setting each one is a new mapping, faulted in page by page), which the
    # next program reads and which is then freed.
    #
    # With the setting the heap grows over the first calls and then holds still. Not from the first call on: glibc
    # (before 2.38) serves an aligned allocation, which XLA's buffers are, only from a free chunk a little larger
    # than asked for, so a freed buffer is reused only once a neighbour is free too; and JAX frees some buffers on
    # its own threads. How many calls that takes varies from run to run (up to about 13 of these, by JAX 0.10 and
    # 0.12): the measure is the quietest 8 calls in a row out of 32.
    stdout = run(f"""
    took = {keep} and runtime.keep_freed_host_memory()
    import jax, jax.numpy as jnp
    write = jax.jit(lambda x: x * 2 + 1)  # a program's output is never fused away, whatever XLA's optimisations
    read = jax.jit(lambda y: y.sum())
    x = jnp.ones((16, 1 << 20), jnp.float32)
    counts = []
    for _ in range(32):
        before = faults()
        read(write(x)).block_until_ready()
        counts.append(faults() - before)
    print(took, min(sum(counts[i:i + 8]) for i in range(len(counts) - 7)), counts)
    """)
    took, quietest, counts = stdout.split(maxsplit=2)
    buffer_pages = 64 * 2**20 // PAGE
    if keep:  # eight calls in a row fault in less than one buffer's pages
        assert took == "True" and int(quietest) < buffer_pages, stdout
    else:  # the problem the setting solves, so that the assertion above means something: every call faults its buffer
        assert took == "False" and int(quietest) > 7 * buffer_pages, stdout


@pytest.mark.skipif(not runtime.GLIBC, reason="glibc only")
@pytest.mark.parametrize("trim_above_2_gib", [False, True])
def test_freed_host_memory_is_kept_above_2_gib(trim_above_2_gib):
    # glibc's largest trim threshold short of "never" is 2 GiB; a model whose step frees more than that at the
    # top of the heap would have it handed back to the kernel and faulted in again on the next step.
    stdout = run(f"""
    assert runtime.keep_freed_host_memory()
    if {trim_above_2_gib}:  # the problem, so that the assertion below means something
        libc.mallopt(-1, 2**31 - 1)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def touch(n=5 << 29):  # 2.5 GiB: every page written, then freed
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
    touch()
    before = faults()
    touch()
    print(faults() - before)
    """)
    pages = (5 << 29) // PAGE
    if trim_above_2_gib:
        assert int(stdout) > pages // 2, stdout
    else:
        assert int(stdout) < 1000, stdout

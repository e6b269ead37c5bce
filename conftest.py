"""Test set-up: 8 simulated CPU devices for the sharding tests, and deterministic hypothesis runs."""
import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its backend, i.e. before any test module imports jax.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many tiny programs: XLA's optimisation passes cost more time than they save there.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Compile time dominates these tests, and many compile the same programs again: every train.train() call, and every
# program the tests start (train.py, sample.py, the benchmarks, the multi-process runs). JAX's persistent cache
# hands each program compiled once in this session to all of them (a fresh folder per session, removed at exit).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptj-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

# derandomize: the same examples on every run, so CI is reproducible; no deadline: compiles are slow.
# max_examples is for the central properties (sharded == unsharded, KV cache == full forward, the ZeRO step): their
# shapes are fixed per mesh, so each compiles its programs once and the examples, which draw new values, cost
# little. The dev profile explores five times as many. Cheap properties set their own counts.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

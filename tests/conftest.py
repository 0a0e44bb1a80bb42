import os

# One intra-op thread for the test process and every process it spawns (gloo workers inherit the
# environment): on a 2-core machine two OpenMP threads per process spin at every barrier once other
# processes take the cores, which once turned a 5 s test into a 300 s timeout.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from hypothesis import HealthCheck, settings

# Triton reads this when a kernel is decorated (at import), so it must be set before any test imports
# `partitioner.kernels`: without CUDA (CI) the kernels run in Triton's interpreter; with a GPU they are compiled for
# it, so the `gpu` tests exercise the real kernels and the autotuner's compile-based pruning.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic in CI; `HYPOTHESIS_PROFILE=dev` for the long local runs.
settings.register_profile(
    "ci", max_examples=50, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """`distributed` tests share one pytest-xdist group: under `-n 2 --dist loadgroup` (the README's command) they
    run one after another on one worker, so a test's 2-4 gloo ranks compete for the cores with at most one
    single-process test of the other worker, never with another test's ranks. `gpu` tests need CUDA: skipped, with
    the reason, on machines without it (CI's)."""
    import pytest

    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("distributed"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

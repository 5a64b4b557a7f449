"""Shared test setup: keep torch to the two cores of CI machines (one, in the modules that opt in), make runs
reproducible, and apply the markers (registered in pyproject.toml): ``gpu`` tests are skipped where there is no
CUDA device, and ``multiprocess`` tests also count as ``slow`` (every process they start imports torch again:
seconds on a small machine)."""

import os
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("multiprocess") is not None:
            item.add_marker(pytest.mark.slow)
        if no_gpu is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a whole test module, the previous count restored after it; a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``. Module scope, so that the module's own
    module-scoped fixtures (a reference training run, a trained model) run on one thread too."""
    from harness import single_torch_thread  # here, not at the top: harness imports dlm_titan

    with single_torch_thread():
        yield

"""Shared pytest setup: deterministic, single-threaded-friendly CPU runs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (training-loop tests: faster and steadier on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest):
    """Run a test at one and at two intra-op threads (one code path whatever the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def poptorch_available() -> bool:
    try:
        import poptorch  # noqa: F401
    except (ImportError, AssertionError):  # AssertionError: an SDK PopTorch beside another torch than its own
        return False
    return True


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """Skip tests marked `ipu` when the Poplar SDK (poptorch) is not importable."""
    if poptorch_available():
        return
    skip = pytest.mark.skip(reason="needs poptorch from Graphcore's Poplar SDK (not installable from PyPI)")
    for item in items:
        if "ipu" in item.keywords:
            item.add_marker(skip)

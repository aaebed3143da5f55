"""Fixtures the architecture test files share (import them into the test module)."""

import gc

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls on a busy 2-core machine: OpenMP hand-off costs more than the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unload(request):
    yield
    if "comfy" in request.fixturenames:  # as test_comfy_node's fixture, for these tests
        gc.collect()
        request.getfixturevalue("comfy").model_management.unload_all_models()

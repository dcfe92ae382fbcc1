"""Fixtures shared by the kernel tests."""
import pytest

from kernels import threads


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def workers(request):
    """1 or 2 worker threads: the CPU kernels split their chunks over that many."""
    before = threads.blas_threads()
    if request.param > 1 and not threads.has_blas_control():
        pytest.skip("no BLAS thread control here: the kernels split over 1 thread")
    threads.set_blas_threads(request.param)
    yield request.param
    threads.set_blas_threads(before)

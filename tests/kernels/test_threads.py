"""kernels/threads.py: the one pool and the process-wide single-BLAS-thread pin."""
import threading

import pytest

from kernels import threads


def test_run_parts_runs_every_part_in_order_and_nests_without_deadlock():
    def inner(i):
        return threading.current_thread().name, i * i

    def outer(i):
        # a split inside a split: from a pool thread it must run inline, not wait on itself
        return [sq for _, sq in threads.run_parts(inner, [i, i + 1, i + 2])]

    assert threads.run_parts(outer, [0, 10]) == [[0, 1, 4], [100, 121, 144]]
    names = {name for name, _ in threads.run_parts(inner, list(range(3)))}
    assert threading.current_thread().name in names


def test_run_parts_joins_the_pool_work_before_raising():
    done = []

    def fn(i):
        if i == 0:
            raise ValueError("first part")
        done.append(i)

    with pytest.raises(ValueError):
        threads.run_parts(fn, [0, 1, 2])
    assert sorted(done) == [1, 2]


def test_pin_nests_and_restores_the_configured_count():
    if not threads.has_blas_control():
        pytest.skip("no BLAS thread control here")
    prev = threads.blas_threads()
    threads.set_blas_threads(2)
    try:
        with threads.single_blas_thread():
            with threads.single_blas_thread():
                assert {c.get_num_threads() for c in threads._blas_controllers()} == {1}
                assert threads.blas_threads() == 2 == threads.cpu_threads()
            assert {c.get_num_threads() for c in threads._blas_controllers()} == {1}
        assert {c.get_num_threads() for c in threads._blas_controllers()} == {2}
        # NumPy's and SciPy's OpenBLAS (the latter behind Numba's np.dot) are both driven
        assert len(threads._blas_controllers()) >= 1
    finally:
        threads.set_blas_threads(prev)

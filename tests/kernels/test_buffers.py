"""kernels.buffers: large kernel outputs come from recycled buffers, never shared while alive."""
import threading

import numpy as np
import pytest

from kernels import buffers

BIG = (600, 1000)  # 2.4 MB of float32: above MIN_BYTES, and so is half of it


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.delenv("GLORO_NO_BUFFER_POOL", raising=False)
    buffers.clear()
    yield
    buffers.clear()


def _addr(a):
    return a.__array_interface__["data"][0]


def test_empty_shape_dtype_and_small_arrays_unpooled():
    a = buffers.empty(BIG, np.float32)
    assert a.shape == BIG and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a.base is not None and buffers.stats()["buffers"] == 1
    s = buffers.empty((10, 10), np.float64)
    assert s.base is None and buffers.stats()["buffers"] == 1
    d = buffers.empty(BIG[0] * BIG[1] // 2, "float64")
    assert d.shape == (BIG[0] * BIG[1] // 2,) and d.dtype == np.float64


def test_a_buffer_is_reused_only_after_its_last_view_dies():
    a = buffers.empty(BIG, np.float32)
    where = _addr(a)
    b = buffers.empty(BIG, np.float32)          # a is alive: a second buffer
    assert not np.shares_memory(a, b)
    view = a[::3, 5:]                           # a view keeps a's buffer busy
    del a
    c = buffers.empty(BIG, np.float32)
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b)
    del view
    d = buffers.empty(BIG, np.float32)          # now free: handed out again
    assert _addr(d) == where
    assert buffers.stats()["buffers"] == 3


def test_a_smaller_request_may_take_a_free_buffer_up_to_twice_its_size():
    a = buffers.empty(BIG, np.float32)
    where = _addr(a)
    del a
    half = buffers.empty((BIG[0] // 2 + 10, BIG[1]), np.float32)
    assert _addr(half) == where
    del half
    tiny = buffers.empty((BIG[0] // 3, BIG[1]), np.float32)  # under half: a buffer of its own
    assert _addr(tiny) != where


def test_zeros_are_zero_on_a_dirty_buffer():
    a = buffers.empty(BIG, np.float32)
    a.fill(7.0)
    del a
    z = buffers.zeros(BIG, np.float32)
    assert z.base is not None and not z.any()


def test_pool_limit_releases_free_buffers_then_falls_back(monkeypatch):
    monkeypatch.setattr(buffers, "POOL_LIMIT", 6 << 20)
    a = buffers.empty(BIG, np.float32)
    b = buffers.empty(BIG, np.float32)
    c = buffers.empty(BIG, np.float32)          # over the limit while a, b live: plain array
    assert c.base is None and buffers.stats()["bytes"] <= 6 << 20
    del a, b
    big = buffers.empty((1300, 1000), np.float32)  # 5.2 MB: the free buffers are dropped for it
    assert big.base is not None and buffers.stats()["buffers"] == 1


def test_env_var_turns_the_pool_off(monkeypatch):
    monkeypatch.setenv("GLORO_NO_BUFFER_POOL", "1")
    a = buffers.empty(BIG, np.float32)
    assert a.base is None and buffers.stats()["buffers"] == 0


def test_threads_never_share_a_live_buffer():
    errors = []
    barrier = threading.Barrier(4)

    def work(tid):
        barrier.wait()
        for i in range(40):
            a = buffers.empty(BIG if i % 2 else (BIG[0] + 7, BIG[1]), np.float32)
            a.fill(tid)
            b = buffers.empty(BIG, np.float32)
            b.fill(-tid)
            if not (np.all(a == tid) and np.all(b == -tid)):
                errors.append((tid, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert buffers.stats()["free_bytes"] == buffers.stats()["bytes"]

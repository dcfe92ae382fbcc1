"""nn test helpers: the CPU kernel backends to inject, and a tiny net of nn ops (``rng`` comes
from tests/conftest.py)."""
import numpy as np
import pytest

import kernels
import nn
from nn import F


def cpu_backends():
    from kernels.registry import device_of

    return [b for b in kernels.backends() if device_of(b) == "cpu"]


@pytest.fixture(params=["reference", "numpy", "numba"])
def cpu_backend(request, monkeypatch):
    """Run the test body once per CPU kernel backend (skipped where unavailable)."""
    if request.param not in cpu_backends():
        pytest.skip(f"backend {request.param} unavailable: {kernels.availability()[request.param]}")
    monkeypatch.setenv("GLORO_BACKEND", request.param)
    return request.param


class SmallNet(nn.Module):
    """conv(k3, s1) - act - conv(k4, s2) - act - flatten - dense, SAME padding, written on
    nn.functions (nn has no layer classes): (N, c, hw, hw) -> (N, classes).

    Parameters, in registration order: conv1_w (w1, c, 3, 3), conv1_b (w1,), conv2_w
    (w2, w1, 4, 4), conv2_b (w2,), dense_w (classes, w2 ceil(hw/2)^2), dense_b (classes,);
    weights Glorot-uniform, biases zero.
    """

    def __init__(self, rng, c=2, widths=(4, 6), hw=6, classes=3, act="relu", dtype=np.float32):
        super().__init__()
        w1, w2 = widths

        def weight(*shape):
            return nn.Parameter(nn.init.glorot_uniform(shape, rng, dtype=dtype))

        self.conv1_w, self.conv1_b = weight(w1, c, 3, 3), nn.Parameter(np.zeros(w1, dtype))
        self.conv2_w, self.conv2_b = weight(w2, w1, 4, 4), nn.Parameter(np.zeros(w2, dtype))
        flat = w2 * ((hw + 1) // 2) ** 2   # SAME, stride 2: ceil(hw / 2) per side
        self.dense_w, self.dense_b = weight(classes, flat), nn.Parameter(np.zeros(classes, dtype))
        self.act = {"relu": F.relu, "minmax": F.minmax}[act]

    def apply(self, x, w1, b1, w2, b2, w3, b3):
        """The net as a function of its input and parameters (Tensors or arrays)."""
        h = self.act(F.conv2d(x, w1, b1, 1, "same"))
        h = self.act(F.conv2d(h, w2, b2, 2, "same"))
        return F.dense(F.flatten(h), w3, b3)

    def forward(self, x):
        return self.apply(x, *self.parameters())


@pytest.fixture
def small_net():
    """The SmallNet class: a tiny Module of nn ops for tests of Module, Adam and training."""
    return SmallNet

"""README's "Adding a layer" example runs as written: the layer's bound is its exact norm,
a net with it trains, and its certificates hold in exact rational arithmetic."""
import re
from pathlib import Path

import numpy as np
import pytest

from gloro_core import layers
from gloro_core.model import GloroNet

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def scale_type():
    text = README.read_text()
    chapter = text[text.index("## Adding a layer"):]
    code = re.search(r"```python\n(.*?)```", chapter, re.S).group(1)
    saved = dict(layers.LAYER_TYPES)
    scope = {}
    exec(compile(code, "README.md: Adding a layer", "exec"), scope)
    yield scope["Scale"]
    layers.LAYER_TYPES.clear()
    layers.LAYER_TYPES.update(saved)


def test_readme_layer_bound_is_its_norm(scale_type):
    layer = scale_type((2, 3, 3), -0.3)
    n = 18
    a = layer.apply(None, np.eye(n).reshape((n, 2, 3, 3))).reshape(n, -1).T
    assert layer.provable()[0] >= np.linalg.norm(a, 2) and layer.norm == pytest.approx(0.3, rel=1e-7)
    with pytest.raises(ValueError, match="layer 1: 'c' must be a finite number"):
        layers.build([{"type": "dense", "units": 4}, {"type": "scale", "c": "x"}, {"type": "dense", "units": 2}],
                     (3,), 2, layers.activation("relu"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_readme_layer_trains_and_certifies_soundly(scale_type, dtype):
    from test_false_certificates import check_against_exact

    from nn.optim import Adam

    spec = [{"type": "conv", "filters": 2, "kernel": 3, "stride": 2}, {"type": "scale", "c": 0.5},
            {"type": "dense", "units": 4}, {"type": "dense", "units": 3}]
    net = GloroNet((1, 4, 4), 3, spec, eps=0.05, dtype=dtype, seed=2)
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 1, 4, 4)).astype(dtype), rng.integers(0, 3, 16)
    opt = Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = net.loss(x, y, power_iters=2)
        first = float(loss.data) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.data) < first
    check_against_exact(net, x[:6], 0.05)
    check_against_exact(net, x[:6], 0.0)
    assert np.any(net.certify(x[:6], eps=0.0)[1] > 0)   # there were certificates to check

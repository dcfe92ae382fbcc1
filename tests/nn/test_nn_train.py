"""End to end: a small conv net of nn ops trained with Adam on a separable synthetic image problem."""
import time

import numpy as np

import nn
from nn.losses import accuracy, softmax_cross_entropy


def synthetic(rng, n=256, hw=10):
    """3 classes: a bright bar in the top, middle or bottom third, under noise."""
    y = rng.integers(0, 3, n)
    x = rng.uniform(0.0, 0.6, (n, 1, hw, hw))
    third = hw // 3
    for k in range(3):
        x[y == k, :, k * third:(k + 1) * third, :] += 0.4
    return x.astype(np.float32), y


def test_small_convnet_learns(rng, small_net):
    x, y = synthetic(rng)
    # conv 1->8 k3 - ReLU - conv 8->8 k4 s2 - ReLU - flatten - dense 200->3
    net = small_net(rng, c=1, widths=(8, 8), hw=10, classes=3)
    opt = nn.Adam(net.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    losses = []
    for epoch in range(6):
        order = rng.permutation(len(y))
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = softmax_cross_entropy(net(nn.Tensor(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    with nn.no_grad():
        acc = accuracy(net(nn.Tensor(x)), y)
    assert np.isfinite(losses).all()
    assert acc >= 0.95, f"train accuracy {acc:.3f} after {len(losses)} steps (losses {losses[:3]} ... {losses[-3:]})"
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert all(p.dtype == np.float32 for p in net.parameters())
    assert elapsed < 30.0, f"training took {elapsed:.1f} s"

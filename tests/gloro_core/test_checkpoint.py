"""gloro-npz/1: round trip, errors, atomic save, layouts read by plain NumPy (and torch)."""
import json
import os

import numpy as np
import pytest

import gloro_core
from gloro_core import checkpoint
from gloro_core.model import GloroNet

LAYERS = [{"type": "conv", "filters": 4, "kernel": 4, "stride": 2, "padding": "same"},
          {"type": "conv", "filters": 6, "kernel": 3, "stride": 1, "padding": "valid"},
          {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]


def _net(activation="relu", seed=0):
    net = GloroNet((2, 8, 7), 3, LAYERS, activation=activation, eps=0.2, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for _, b in net.params:
        b.data[:] = rng.normal(0, 0.2, b.shape)
    return net


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    net = _net("minmax")
    net.loss(rng.random((4, 2, 8, 7)).astype(np.float32), np.array([0, 1, 2, 1]), power_iters=3)
    lip = net.update_lipschitz()
    p = tmp_path / "m.npz"
    mom = rng.standard_normal((4, 2, 4, 4)).astype(np.float32)
    net.save(p, extra={"epoch": 7, "adam": {"t": 12, "m": [mom, mom * 2]}, "note": "hi"})
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        names = set(z.files)
    assert meta["format"] == "gloro-npz/1" and meta["input_shape"] == [2, 8, 7]
    assert meta["layers"] == LAYERS and meta["activation"] == "minmax" and meta["variant"] == "margin"
    assert meta["lipschitz"]["k_sub_provable"] == lip["k_sub_provable"]
    for i in range(4):
        assert {f"param.{i}.weight", f"param.{i}.bias", f"iterate.{i}"} <= names
    back = gloro_core.load(p)
    x = rng.random((5, 2, 8, 7)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(x), net.logits(x))
    for a, b in zip(back.iterates, net.iterates):
        np.testing.assert_array_equal(a, b)
    assert back.extra["epoch"] == 7 and back.extra["note"] == "hi" and back.extra["adam"]["t"] == 12
    np.testing.assert_array_equal(back.extra["adam"]["m"][1], mom * 2)
    assert back.lipschitz()["k_sub_provable"] == pytest.approx(lip["k_sub_provable"], rel=1e-12)
    np.testing.assert_array_equal(back.certify(x)[0], net.certify(x)[0])


def _rewrite(src, dst, drop=None, change=None, meta=None):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if drop:
        del arrays[drop]
    if change:
        arrays[change[0]] = change[1]
    if meta is not None:
        arrays["meta"] = np.array(meta)
    np.savez(dst, **arrays)


def test_load_errors(tmp_path):
    net = _net()
    p = tmp_path / "ok.npz"
    net.save(p)
    q = str(tmp_path / "bad.npz")
    _rewrite(p, q, drop="param.1.weight")
    with pytest.raises(ValueError, match=r"missing array 'param.1.weight'"):
        gloro_core.load(q)
    _rewrite(p, q, drop="iterate.2")
    with pytest.raises(ValueError, match="iterate.2"):
        gloro_core.load(q)
    _rewrite(p, q, change=("param.2.weight", np.zeros((8, 5), np.float32)))
    with pytest.raises(ValueError, match=r"'param.2.weight' has shape \(8, 5\)"):
        gloro_core.load(q)
    _rewrite(p, q, change=("param.0.bias", np.zeros((4, 1), np.float32)))
    with pytest.raises(ValueError, match="param.0.bias"):
        gloro_core.load(q)
    with np.load(p) as z:
        meta = json.loads(str(z["meta"]))
    _rewrite(p, q, meta=json.dumps(dict(meta, format="gloro-npz/9")))
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        gloro_core.load(q)
    _rewrite(p, q, meta="{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gloro_core.load(q)
    _rewrite(p, q, drop="meta")
    with pytest.raises(ValueError, match="missing array 'meta'"):
        gloro_core.load(q)
    _rewrite(p, q, meta=json.dumps({k: v for k, v in meta.items() if k != "layers"}))
    with pytest.raises(ValueError, match="layers"):
        gloro_core.load(q)
    with open(q, "wb") as fh:
        fh.write(b"not a zip file")
    with pytest.raises(ValueError, match="bad.npz"):
        gloro_core.load(q)
    _rewrite(p, q, change=("param.0.weight", np.full((4, 2, 4, 4), np.nan, np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        gloro_core.load(q)


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    net = _net()
    p = tmp_path / "m.npz"
    net.save(p, extra={"epoch": 1})
    before = p.read_bytes()
    net.params[0][0].data *= 2
    # an unwritable value in extra
    with pytest.raises(TypeError):
        net.save(p, extra={"bad": object()})
    assert p.read_bytes() == before

    def broken(fh, **arrays):     # write part of the file, then fail
        fh.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        net.save(p, extra={"epoch": 2})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]       # no temporary left behind
    assert gloro_core.load(p).extra == {"epoch": 1}


# ------------------------------------------------------------------ layouts, as another framework reads them

def _same_pads(n, k, s):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _np_conv(x, w, b, stride, padding):
    """OIHW conv with TensorFlow SAME/VALID padding by explicit loops over output pixels."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if padding == "same":
        (pt, pb), (pl, pr) = _same_pads(h, kh, stride), _same_pads(wd, kw, stride)
    else:
        pt = pb = pl = pr = 0
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    oh = (h + pt + pb - kh) // stride + 1
    ow = (wd + pl + pr - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
    return y + b[None, :, None, None]


def _np_forward(path, x):
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arr = {k: z[k].astype(np.float64) for k in z.files if k != "meta"}
    h = x.astype(np.float64)
    layers = meta["layers"]
    for i, spec in enumerate(layers):
        w, b = arr[f"param.{i}.weight"], arr[f"param.{i}.bias"]
        if spec["type"] == "conv":
            h = _np_conv(h, w, b, spec["stride"], spec["padding"])
        else:
            h = h.reshape(len(h), -1) @ w.T + b       # flatten in C, H, W order; dense (out, in)
        if i < len(layers) - 1:
            if meta["activation"] == "relu":
                h = np.maximum(h, 0)
            else:
                a, c = h[:, 0::2], h[:, 1::2]
                h = np.stack([np.minimum(a, c), np.maximum(a, c)], axis=2).reshape(h.shape)
    return h


@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_plain_numpy_forward_from_npz(tmp_path, activation):
    net = _net(activation, seed=3)
    p = tmp_path / "m.npz"
    net.save(p)
    x = np.random.default_rng(1).random((6, 2, 8, 7)).astype(np.float32)
    np.testing.assert_allclose(_np_forward(p, x), net.logits(x), rtol=1e-5, atol=1e-5)


def test_torch_loads_the_layout(tmp_path):
    torch = pytest.importorskip("torch")
    net = _net("relu", seed=4)
    p = tmp_path / "m.npz"
    net.save(p)
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arr = {k: z[k] for k in z.files if k != "meta"}
    mods, h = [], (2, 8, 7)
    for i, spec in enumerate(meta["layers"]):
        w = torch.from_numpy(arr[f"param.{i}.weight"].copy())
        b = torch.from_numpy(arr[f"param.{i}.bias"].copy())
        if spec["type"] == "conv":
            m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=spec["stride"], padding=0)
            k, s = spec["kernel"], spec["stride"]
            pads = (_same_pads(h[2], k, s) + _same_pads(h[1], k, s)) if spec["padding"] == "same" else (0, 0, 0, 0)
            (pl, pr), (pt, pb) = pads[:2], pads[2:]
            mods += [torch.nn.ZeroPad2d((pl, pr, pt, pb)), m]
            oh = (h[1] + pt + pb - k) // s + 1
            ow = (h[2] + pl + pr - k) // s + 1
            h = (w.shape[0], oh, ow)
        else:
            if i == 0 or meta["layers"][i - 1]["type"] == "conv":
                mods.append(torch.nn.Flatten())
            m = torch.nn.Linear(w.shape[1], w.shape[0])
            mods.append(m)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        if i < len(meta["layers"]) - 1:
            mods.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*mods)
    x = np.random.default_rng(2).random((6, 2, 8, 7)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, net.logits(x), rtol=1e-5, atol=1e-5)


def test_save_npz_rejects_non_json(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save_npz(tmp_path / "x.npz", {"a": {1, 2}}, {})
    assert not os.listdir(tmp_path)


def test_npz_whose_headers_ask_for_more_than_the_file_holds(tmp_path):
    """np.load allocates an array of the header's shape before reading: a member declaring
    (10**5, 10**5) float64 (80 GB) in a few bytes, or a deflated member unpacking past the
    limit, is refused before anything is allocated."""
    import tracemalloc
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,)))
    header["shape"] = (10 ** 5, 10 ** 5)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as zf:
        with zf.open("meta.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array('{"format": "gloro-npz/1"}'))
        with zf.open("param.0.weight.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            fh.write(b"\0" * 64)
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"bomb\.npz: .*param\.0\.weight\.npy: header declares shape "
                                         r"\(100000, 100000\)"):
        checkpoint.load_npz(bomb)
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    squeezed = tmp_path / "squeezed.npz"
    np.savez_compressed(squeezed, meta=np.array('{"format": "gloro-npz/1"}'), big=np.zeros(1 << 21))
    saved = checkpoint.MAX_INFLATED_BYTES
    try:
        checkpoint.MAX_INFLATED_BYTES = 1 << 20
        with pytest.raises(ValueError, match=r"compressed arrays unpack to more than 1048576 bytes"):
            checkpoint.load_npz(squeezed)
    finally:
        checkpoint.MAX_INFLATED_BYTES = saved
    assert checkpoint.load_npz(squeezed)[1]["big"].shape == (1 << 21,)   # under the real limit
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"plain\.npy: not a readable \.npz checkpoint \(not a zip"):
        checkpoint.load_npz(tmp_path / "plain.npy")


def test_test_and_training_eps_are_kept_apart(tmp_path):
    """net.eps was the training eps, so net.certify(x) certified at eps_train (0.45 for an
    eps-0.3 run). Now eps is the test radius and eps_train the loss's; older files (one
    'eps', the training one) take their test eps from the training config."""
    net = GloroNet((1, 6, 6), 3, [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2},
                                  {"type": "dense", "units": 3}], eps=0.3, eps_train=0.45, seed=1)
    x = np.random.default_rng(0).random((4, 1, 6, 6)).astype(np.float32)
    net.certify(x)
    assert net.last_certification["eps"] == 0.3
    y = np.zeros(4, np.int64)
    assert float(net.loss(x, y, power_iters=0).data) == float(net.loss(x, y, eps=0.45, power_iters=0).data)
    assert float(net.loss(x, y, power_iters=0).data) != float(net.loss(x, y, eps=0.3, power_iters=0).data)
    p = tmp_path / "new.npz"
    net.save(p)
    back = gloro_core.load(p)
    assert (back.eps, back.eps_train) == (0.3, 0.45)
    # an older file: meta eps = the training eps, the test eps only in the training config
    meta, arrays, _ = checkpoint.load_npz(p)
    meta.pop("eps_train")
    meta["eps"] = 0.45
    old = tmp_path / "old.npz"
    checkpoint.save_npz(old, meta, arrays, {"train_state": {"config": {"eps": 0.3, "train_eps": 0.45}}})
    back = gloro_core.load(old)
    assert (back.eps, back.eps_train) == (0.3, 0.45)
    assert np.array_equal(back.certify(x)[1], net.certify(x)[1])
    checkpoint.save_npz(old, meta, arrays, {})       # no config: the one eps serves both
    assert (gloro_core.load(old).eps, gloro_core.load(old).eps_train) == (0.45, 0.45)

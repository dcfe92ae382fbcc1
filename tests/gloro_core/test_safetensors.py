"""gloro-safetensors/1: round trips with gloro-npz/1, PyTorch loading, weights-only files
(fresh iterates), bad files, and the engine without the safetensors package."""
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import gloro_core
from gloro_core import checkpoint
from gloro_core.model import GloroNet

st = pytest.importorskip("safetensors.numpy", reason="the optional safetensors package is not installed")

LAYERS = [{"type": "conv", "filters": 4, "kernel": 4, "stride": 2, "padding": "same"},
          {"type": "conv", "filters": 6, "kernel": 3, "stride": 1, "padding": "valid"},
          {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]
# every layer type whose torch export holds the stored tensors as they are (LiResNet exports
# w + I and a normalised dense its normalised weight: those need that transform in torch)
TORCH_LAYERS = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "same"},
                {"type": "invdown"},
                {"type": "conv", "filters": 6, "kernel": 3, "stride": 2, "padding": "same"},
                {"type": "avgpool", "size": 2},
                {"type": "conv", "filters": 5, "kernel": 2, "stride": 1, "padding": "valid"},
                {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]


def _net(activation="relu", seed=0, layers=LAYERS, shape=(2, 8, 7)):
    """A net with nonzero biases and iterates moved off their start by a training step."""
    net = GloroNet(shape, 3, layers, activation=activation, eps=0.2, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for _, b in net.params:
        b.data[:] = rng.normal(0, 0.2, b.shape)
    net.loss(rng.random((4,) + shape).astype(np.float32), np.array([0, 1, 2, 1]), power_iters=3)
    return net


def _x(shape=(2, 8, 7), n=6):
    return np.random.default_rng(7).random((n,) + shape).astype(np.float32)


def _same(a, b, x):
    """Bit-identical logits, gloro logits, certificates, iterates."""
    np.testing.assert_array_equal(a.logits(x), b.logits(x))
    np.testing.assert_array_equal(a.gloro_logits(x), b.gloro_logits(x))
    for bound in ("provable", "power"):
        pa, ra = a.certify(x, bound=bound)
        pb, rb = b.certify(x, bound=bound)
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(ra, rb)
    for va, vb in zip(a.iterates, b.iterates):
        np.testing.assert_array_equal(va, vb)


def _header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _write_raw(path, header: dict, data: bytes, pad=True):
    """A safetensors file from an explicit header (lies included) and data bytes."""
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + data)


def _rewrite(src, dst, drop=(), change=None, meta=None, metadata=None):
    """Copy a .safetensors checkpoint through the safetensors package with edits."""
    arrays = st.load_file(str(src))
    for k in drop:
        del arrays[k]
    if change:
        arrays[change[0]] = change[1]
    md = {checkpoint.ST_META_KEY: meta if meta is not None else _header(src)["__metadata__"]["gloro_meta"]}
    st.save_file(arrays, str(dst), metadata=md if metadata is None else metadata)


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_round_trip_npz_safetensors_bit_identical(tmp_path, activation):
    net = _net(activation)
    net.update_lipschitz()
    x = _x()
    a, b = tmp_path / "m.npz", tmp_path / "m.safetensors"
    net.save(a)
    net.save(b)
    assert zipfile.is_zipfile(a) and not zipfile.is_zipfile(b)
    assert checkpoint.sniff(a) == "npz" and checkpoint.sniff(b) == "safetensors"
    # the same meta dict, only the format differs
    with np.load(a) as z:
        meta_npz = json.loads(str(z["meta"]))
    meta_st = json.loads(_header(b)["__metadata__"]["gloro_meta"])
    assert meta_st.pop("format") == "gloro-safetensors/1" and meta_npz.pop("format") == "gloro-npz/1"
    assert meta_st == meta_npz
    # the same tensors under the same names
    tensors = st.load_file(str(b))
    with np.load(a) as z:
        assert set(tensors) == set(z.files) - {"meta"}
        for k, v in tensors.items():
            np.testing.assert_array_equal(v, z[k])
            assert v.dtype == z[k].dtype
    from_npz, from_st = gloro_core.load(a), gloro_core.load(b)
    assert not from_st.loaded_without_iterates and not from_npz.loaded_without_iterates
    # npz -> safetensors -> npz before anything converges the loaded iterates
    from_npz.save(tmp_path / "c.safetensors")
    gloro_core.load(tmp_path / "c.safetensors").save(tmp_path / "c.npz")
    back = gloro_core.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(from_st.logits(x), net.logits(x))
    _same(from_npz, from_st, x)
    _same(back, gloro_core.load(b), x)
    assert back.lipschitz() == from_st.lipschitz()
    assert from_st.lipschitz()["k_sub_provable"] == pytest.approx(net.lipschitz()["k_sub_provable"], rel=1e-12)


def test_training_state_round_trip(tmp_path):
    """extra (the training state: optimizer moments of several dtypes, nested JSON) comes
    back identical from a .safetensors file, its arrays as tensors extra.{k}."""
    net = _net()
    rng = np.random.default_rng(3)
    moments = [rng.standard_normal(p.shape).astype(np.float32) for p in net.parameters()]
    extra = {"train_state": {"epoch": 4, "best_vra": 0.25, "history": [{"loss": 1.5}, {"loss": None}],
                             "optimizer": {"t": np.int64(12), "m": moments, "v": [m * m for m in moments],
                                           "step": np.array(12, np.int64), "mask": np.array([True, False])},
                             "config": {"eps": 0.3, "name": "x"}}}
    p = tmp_path / "last.safetensors"
    net.save(p, extra=extra)
    names = set(st.load_file(str(p)))
    assert {f"extra.{k}" for k in range(2 * len(moments) + 2)} <= names
    got = gloro_core.load(p).extra["train_state"]
    opt = got["optimizer"]
    assert got["epoch"] == 4 and got["history"] == [{"loss": 1.5}, {"loss": None}] and opt["t"] == 12
    assert got["config"] == {"eps": 0.3, "name": "x"}
    for a, b in zip(opt["m"] + opt["v"], moments + [m * m for m in moments]):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32
    assert opt["step"].shape == () and opt["step"].dtype == np.int64 and int(opt["step"]) == 12
    np.testing.assert_array_equal(opt["mask"], [True, False])
    # the eps pair and the other meta survive too
    back = gloro_core.load(p)
    assert (back.eps, back.eps_train, back.seed, back.power_iters) == (net.eps, net.eps_train, net.seed, net.power_iters)


def test_suffix_picks_the_format(tmp_path):
    net = _net()
    for name, fmt in [("a.npz", "npz"), ("a.safetensors", "safetensors"), ("a.SafeTensors", "safetensors"),
                      ("a.ckpt", "npz")]:
        net.save(tmp_path / name)
        assert checkpoint.sniff(tmp_path / name) == fmt, name
    # the content decides on load, not the name
    os.replace(tmp_path / "a.safetensors", tmp_path / "renamed.npz")
    os.replace(tmp_path / "a.npz", tmp_path / "renamed.safetensors")
    x = _x()
    np.testing.assert_array_equal(gloro_core.load(tmp_path / "renamed.npz").logits(x), net.logits(x))
    np.testing.assert_array_equal(gloro_core.load(tmp_path / "renamed.safetensors").logits(x), net.logits(x))


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    net = _net()
    p = tmp_path / "m.safetensors"
    net.save(p, extra={"epoch": 1})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        net.save(p, extra={"bad": object()})
    with pytest.raises(TypeError, match="safetensors cannot store dtype"):
        net.save(p, extra={"names": np.array(["a", "b"])})

    def broken(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        net.save(p, extra={"epoch": 2})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert gloro_core.load(p).extra == {"epoch": 1}


# ------------------------------------------------------------------ PyTorch

def test_pytorch_loads_the_file_into_torch_nn(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (test-only dependency)")
    from safetensors.torch import load_file

    shape = (2, 16, 16)
    net = _net(layers=TORCH_LAYERS, shape=shape)
    p = tmp_path / "m.safetensors"
    net.save(p)
    tensors = load_file(str(p))        # torch tensors, by the engine's names
    mods, last = [], net.num_layers - 1
    for i, layer in enumerate(net.layers):
        exported = layer.torch_modules() + (net.act.torch_modules() if i < last and layer.activated else [])
        for cls, kwargs, state in exported:
            m = getattr(torch.nn, cls)(**kwargs)
            if state:   # name mapping: a module's weight/bias is param.{i}.weight/bias
                sd = {k: tensors[f"param.{i}.{k}"] for k in state}
                for k, v in state.items():   # the export holds exactly the stored tensors
                    np.testing.assert_array_equal(sd[k].numpy(), v)
                m.load_state_dict(sd)
            mods.append(m)
    model = torch.nn.Sequential(*mods)
    x = _x(shape)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, net.logits(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ weights-only files

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_weights_only_file_gets_fresh_iterates(tmp_path, suffix, caplog):
    net = _net()
    full = tmp_path / ("full" + suffix)
    net.save(full)
    q = tmp_path / ("weights" + suffix)
    drop = [f"iterate.{i}" for i in range(net.num_layers)]
    if suffix == ".npz":
        with np.load(full) as z:
            np.savez(q, **{k: z[k] for k in z.files if k not in drop})
    else:
        _rewrite(full, q, drop=drop)
    with caplog.at_level("INFO", logger="gloro_core.checkpoint"):
        a = gloro_core.load(q)
    assert a.loaded_without_iterates and "no power iterates" in caplog.text
    b = gloro_core.load(q)
    for va, vb in zip(a.iterates, b.iterates):   # seeded from the meta's seed
        np.testing.assert_array_equal(va, vb)
        assert va.shape == vb.shape and va.dtype == np.float32
        assert np.linalg.norm(va) == pytest.approx(1.0, rel=1e-6)
    x = _x()
    np.testing.assert_array_equal(a.logits(x), net.logits(x))
    # certification converges the power method from the fresh iterates: the proof does not
    # depend on them, so the provable certificates are the full file's
    full_net = gloro_core.load(full)
    np.testing.assert_array_equal(a.certify(x)[0], full_net.certify(x)[0])
    np.testing.assert_array_equal(a.certify(x)[1], full_net.certify(x)[1])
    assert a.lipschitz()["k_sub_power"] == pytest.approx(full_net.lipschitz()["k_sub_power"], rel=1e-4)


def test_some_iterates_missing_is_an_error(tmp_path):
    p, q = tmp_path / "m.safetensors", tmp_path / "bad.safetensors"
    _net().save(p)
    _rewrite(p, q, drop=["iterate.2"])
    with pytest.raises(ValueError, match=r"bad.safetensors: missing array 'iterate.2'"):
        gloro_core.load(q)


# ------------------------------------------------------------------ bad files

def _bad(path, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        gloro_core.load(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg


def test_bad_safetensors_files(tmp_path):
    net = _net()
    p = tmp_path / "ok.safetensors"
    net.save(p)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    q = tmp_path / "bad.safetensors"
    header = _header(p)
    body = data[8 + n:]

    # truncated: in the length, in the header, in the data
    for cut in (0, 5, 8 + n // 2, len(data) - 3):
        q.write_bytes(data[:cut])
        _bad(q, "truncated|header declares")
    # the header lying about sizes: length beyond the file, offsets beyond the data,
    # a shape whose bytes differ from its offsets' span, overlapping tensors
    q.write_bytes(struct.pack("<Q", 10 ** 15) + data[8:])
    _bad(q, "header declares 1000000000000000 bytes")
    h = json.loads(json.dumps(header))
    h["param.0.weight"]["data_offsets"][1] += 10 ** 9
    _write_raw(q, h, body)
    _bad(q, "'param.0.weight' ends at data byte")
    h = json.loads(json.dumps(header))
    h["param.0.weight"]["shape"] = [4000, 2000, 4, 4]
    _write_raw(q, h, body)
    _bad(q, r"'param.0.weight' declares shape \(4000, 2000, 4, 4\) of F32")
    h = json.loads(json.dumps(header))
    h["param.0.bias"]["data_offsets"] = h["param.0.weight"]["data_offsets"]
    h["param.0.bias"]["shape"] = header["param.0.weight"]["shape"]
    _write_raw(q, h, body)
    _bad(q, "overlap")
    h = json.loads(json.dumps(header))
    h["param.0.weight"]["dtype"] = "BF16"
    _write_raw(q, h, body)
    _bad(q, "unsupported dtype 'BF16'")
    h = json.loads(json.dumps(header))
    h["param.0.weight"]["shape"] = [-1, 2, 4, 4]
    _write_raw(q, h, body)
    _bad(q, "shape must be a list of ints")
    q.write_bytes(struct.pack("<Q", 6) + b"{nope}" + body)
    _bad(q, "header is not valid JSON")

    # tensors of the wrong shape or dtype (written by the real library, honest headers)
    _rewrite(p, q, change=("param.2.weight", np.zeros((8, 5), np.float32)))
    _bad(q, r"'param.2.weight' has shape \(8, 5\), expected \(8, 24\)")
    _rewrite(p, q, change=("iterate.1", np.zeros((1, 4, 4, 3), np.float32)))
    _bad(q, "'iterate.1' has shape")
    _rewrite(p, q, change=("param.0.weight", np.zeros((4, 2, 4, 4), np.int32)))
    _bad(q, "'param.0.weight' has dtype int32, expected a float array")
    _rewrite(p, q, change=("param.0.bias", np.full(4, np.inf, np.float32)))
    _bad(q, "NaN or inf")
    _rewrite(p, q, change=("stowaway", np.zeros(3, np.float32)))
    _bad(q, "unexpected tensor 'stowaway'")
    _rewrite(p, q, drop=["param.1.weight"])
    _bad(q, "missing array 'param.1.weight'")

    # the meta: missing, not JSON, another format, lacking a key, a missing extra array
    _rewrite(p, q, metadata={})
    _bad(q, "lacks 'gloro_meta'")
    _rewrite(p, q, metadata={"other": "x"})
    _bad(q, "lacks 'gloro_meta'")
    _rewrite(p, q, meta="{not json")
    _bad(q, "'gloro_meta' is not valid JSON")
    meta = json.loads(header["__metadata__"]["gloro_meta"])
    _rewrite(p, q, meta=json.dumps(dict(meta, format="gloro-npz/1")))
    _bad(q, "unknown checkpoint format 'gloro-npz/1'")
    _rewrite(p, q, meta=json.dumps({k: v for k, v in meta.items() if k != "layers"}))
    _bad(q, "layers")
    _rewrite(p, q, meta=json.dumps(dict(meta, extra={"m": {"__array__": "extra.0"}})))
    _bad(q, "missing array 'extra.0'")
    # the library's own checks (a gap in the data) come back as the same kind of error
    h = json.loads(json.dumps(header))
    _write_raw(q, h, body + b"\0" * 8)
    _bad(q, "not a readable .safetensors checkpoint")
    # a file that is neither format, named .safetensors
    q.write_bytes(b"hello world, not a checkpoint")
    _bad(q, "header declares")


def test_big_declared_shape_is_refused_before_reading(tmp_path, monkeypatch):
    """A meta declaring a huge input is refused from the header, before any tensor is read."""
    p = tmp_path / "m.safetensors"
    _net().save(p)
    meta = json.loads(_header(p)["__metadata__"]["gloro_meta"])
    q = tmp_path / "big.safetensors"
    _rewrite(p, q, meta=json.dumps(dict(meta, input_shape=[2, 100000, 100000])))

    def no_reading(*a, **k):
        raise AssertionError("tensors read before the shape check")

    monkeypatch.setattr("safetensors.safe_open", no_reading)
    _bad(q, "has shape")


# ------------------------------------------------------------------ without the package

def test_clear_error_without_the_package(tmp_path, monkeypatch):
    net = _net()
    p = tmp_path / "m.safetensors"
    net.save(p)
    for mod in [m for m in sys.modules if m == "safetensors" or m.startswith("safetensors.")]:
        monkeypatch.setitem(sys.modules, mod, None)    # import now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[safetensors\]"'):
        net.save(tmp_path / "n.safetensors")
    with pytest.raises(ImportError, match=r'm.safetensors: reading .*pip install -e "\.\[safetensors\]"'):
        gloro_core.load(p)
    net.save(tmp_path / "n.npz")                       # npz needs nothing
    gloro_core.load(tmp_path / "n.npz")


def test_engine_imports_without_the_package():
    code = ("import sys; sys.modules['safetensors'] = None\n"
            "import gloro_core, gloro_core.model, gloro_core.checkpoint, gloro_core.train, gloro_core.cli\n"
            "print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

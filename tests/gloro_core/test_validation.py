"""Bad input to the model API, checkpoints and the evaluation commands: clear errors, not
silent coercion or tracebacks."""
import json
import math

import numpy as np
import pytest

import gloro_core
from gloro_core import architectures
from gloro_core.cli import _print, build_parser, main
from gloro_core.model import GloroNet

SHAPE = (1, 6, 6)
LAYERS = [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
          {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]


def _net(**kw):
    return GloroNet(SHAPE, 3, LAYERS, eps=0.1, **kw)


def _net10():
    """A net for the synthetic dataset's 10 classes (the CLI tests)."""
    return GloroNet(SHAPE, 10, LAYERS[:2] + [{"type": "dense", "units": 10}], eps=0.1)


def _x(n=4, seed=0):
    return np.random.default_rng(seed).random((n,) + SHAPE).astype(np.float32)


def _strict_json(text):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def bad(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("val") / "m.npz"
    cfg = {"dataset": "synthetic", "synthetic_shape": list(SHAPE), "synthetic_n": [32, 16],
           "eps": 0.1}
    _net10().save(p, extra={"train_state": {"config": cfg}})
    return str(p)


# ---------------------------------------------------------------- 1, 2: CLI flags

@pytest.mark.parametrize("argv,flag", [
    (["certify", "m.npz", "--limit", "0"], "--limit"),
    (["certify", "m.npz", "--limit", "-1"], "--limit"),
    (["attack", "m.npz", "--limit", "0"], "--limit"),
    (["lipschitz", "m.npz", "--limit", "-3"], "--limit"),
    (["train", "--limit", "0"], "--limit"),
    (["train", "--test-limit", "-1"], "--test-limit"),
    (["certify", "m.npz", "--batch", "0"], "--batch"),
    (["attack", "m.npz", "--batch", "-2"], "--batch"),
    (["attack", "m.npz", "--steps", "0"], "--steps"),
    (["attack", "m.npz", "--restarts", "0"], "--restarts"),
    (["attack", "m.npz", "--step-size", "-0.1"], "--step-size"),
    (["lipschitz", "m.npz", "--points", "0"], "--points"),
    (["lipschitz", "m.npz", "--pairs", "0"], "--pairs"),
    (["lipschitz", "m.npz", "--steps", "-1"], "--steps"),
    (["lipschitz", "m.npz", "--step-lr", "nan"], "--step-lr"),
    (["certify", "m.npz", "--limit", "1.5"], "--limit"),
    (["certify", "m.npz", "--eps", "-0.1"], "--eps"),
    (["certify", "m.npz", "--eps", "nan"], "--eps"),
    (["attack", "m.npz", "--eps", "inf"], "--eps"),
    (["lipschitz", "m.npz", "--eps", "-inf"], "--eps"),
])
def test_bad_numeric_flags_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in err, err


def test_good_numeric_flags_parse():
    a = build_parser().parse_args(["certify", "m.npz", "--limit", "3", "--batch", "2", "--eps", "0"])
    assert (a.limit, a.batch, a.eps) == (3, 2, 0.0)
    a = build_parser().parse_args(["attack", "m.npz", "--steps", "1", "--restarts", "1"])
    assert (a.steps, a.restarts, a.limit) == (1, 1, None)


def test_certify_limit_zero_does_not_run_the_whole_set(ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["certify", ckpt, "--limit", "0", "--json"])
    assert capsys.readouterr().out == ""  # nothing certified
    assert main(["certify", ckpt, "--limit", "5", "--json"]) == 0
    assert _strict_json(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 5


def test_attack_steps_zero_is_an_argparse_error(ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["attack", ckpt, "--limit", "3", "--steps", "0"])
    assert "argument --steps: expected a positive integer, got '0'" in capsys.readouterr().err


def test_checkpoint_eps_is_validated(tmp_path, capsys):
    p = tmp_path / "m.npz"
    _net10().save(p, extra={"train_state": {"config": {"dataset": "synthetic", "synthetic_shape": list(SHAPE),
                                                     "synthetic_n": [32, 16], "eps": "0.3"}}})
    assert main(["certify", str(p), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "eps" in err


@pytest.mark.parametrize("key, value", [("synthetic_n", 5), ("synthetic_n", [32, 0]), ("synthetic_shape", [1, "8"]),
                                        ("synthetic_shape", [1, 8]), ("seed", 1.5), ("seed", -1)])
def test_checkpoint_dataset_settings_are_validated(tmp_path, capsys, key, value):
    """The evaluation commands take seed and synthetic sizes from the checkpoint: a bad one
    is a one-line error naming the file and key (synthetic_n 5 was a TypeError traceback)."""
    cfg = {"dataset": "synthetic", "synthetic_shape": list(SHAPE), "synthetic_n": [32, 16], "eps": 0.3}
    cfg[key] = value
    p = tmp_path / "m.npz"
    _net10().save(p, extra={"train_state": {"config": cfg}})
    assert main(["certify", str(p), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{p}: train_state.config.{key}" in err and len(err.strip().splitlines()) <= 2


# ---------------------------------------------------------------- 3: integer images

@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32, bool])
def test_integer_images_are_refused(dtype):
    net = _net()
    xi = (_x() * 255).astype(dtype)
    for call in (lambda: net.certify(xi), lambda: net.gloro_logits(xi), lambda: net.logits(xi),
                 lambda: net.predict(xi), lambda: net.loss(xi, np.zeros(4, np.int64)),
                 lambda: net.standard_loss(xi, np.zeros(4, np.int64)),
                 lambda: net.gloro_logits_tensor(xi)):
        with pytest.raises(TypeError, match=r"x must be a float array.*x / 255\.0"):
            call()


def test_integer_list_is_refused_float_list_accepted():
    net = _net()
    with pytest.raises(TypeError, match="float array"):
        net.logits(np.zeros((1,) + SHAPE, np.int64).tolist())
    assert net.logits(np.zeros((1,) + SHAPE).tolist()).shape == (1, 3)


def test_attack_refuses_integer_images():
    from gloro_core.attacks import pgd_l2

    with pytest.raises(TypeError, match="float array"):
        pgd_l2(_net(), (_x() * 255).astype(np.uint8), np.zeros(4, np.int64), eps=0.1, steps=2)


# ---------------------------------------------------------------- 4: empty batches

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bound", ["provable", "power"])
def test_empty_batch(dtype, bound):
    net = _net(dtype=dtype)
    x0 = np.zeros((0,) + SHAPE, np.float32)
    for tight in (True, False):
        pred, radius = net.certify(x0, bound=bound, tight_radius=tight)
        assert pred.shape == (0,) and pred.dtype == np.int64
        assert radius.shape == (0,) and radius.dtype == np.float64
    g = net.gloro_logits(x0, bound=bound)
    assert g.shape == (0, 4) and g.dtype == np.float64
    lg = net.logits(x0)
    assert lg.shape == (0, 3) and lg.dtype == dtype
    assert net.predict(x0).shape == (0,)
    # the checks still run on an empty batch
    with pytest.raises(ValueError, match="shape"):
        net.certify(np.zeros((0, 1, 6, 5), np.float32))
    with pytest.raises(ValueError, match="eps"):
        net.certify(x0, eps=-1.0)
    # a non-empty batch after an empty one is unaffected
    x = _x()
    np.testing.assert_array_equal(net.certify(x)[0], _net(dtype=dtype).certify(x)[0])


# ---------------------------------------------------------------- 5: layer specs

def _conv(**kw):
    return [dict(LAYERS[0], **kw)] + LAYERS[1:]


@pytest.mark.parametrize("layers,where", [
    (_conv(padding=1.7), "layer 0: 'padding'"),
    (_conv(padding=True), "layer 0: 'padding'"),
    (_conv(padding=-1), "layer 0: 'padding'"),
    (_conv(kernel=4.9), "layer 0: 'kernel'"),
    (_conv(kernel=3.0), "layer 0: 'kernel'"),
    (_conv(kernel="3"), "layer 0: 'kernel'"),
    (_conv(kernel=[3, 3]), "layer 0: 'kernel'"),
    (_conv(filters=True), "layer 0: 'filters'"),
    (_conv(stride=2.0), "layer 0: 'stride'"),
    (_conv(stride=np.float64(2)), "layer 0: 'stride'"),
    (LAYERS[:1] + [{"type": "dense", "units": 10.5}, LAYERS[2]], "layer 1: 'units'"),
    (LAYERS[:2] + [{"type": "dense", "units": np.bool_(True)}], "layer 2: 'units'"),
    (LAYERS[:2] + [{"type": "dense", "units": 3.0}], "layer 2: 'units'"),
])
def test_layer_spec_types_are_strict(layers, where):
    with pytest.raises(ValueError, match=where):
        GloroNet(SHAPE, 3, layers)


def test_layer_spec_numpy_ints_become_python_ints():
    layers = [{"type": "conv", "filters": np.int64(4), "kernel": np.int32(3), "stride": np.uint8(2),
               "padding": np.int16(1)}, {"type": "dense", "units": np.int64(3)}]
    net = GloroNet(SHAPE, 3, layers)
    for spec in net.specs:
        for k, v in spec.items():
            assert type(v) in (int, str), (k, type(v))
    json.dumps(net.meta())


def test_compact_architecture_gives_python_ints():
    for arch in ("c(4,3,2),d(8)", "2C2F", "4C3F"):
        for spec in architectures.layer_specs(arch, 3):
            for k, v in spec.items():
                assert type(v) in (int, str), (arch, k, type(v))
    net = architectures.build("c(4,3,2),d(8)", SHAPE, 3)
    assert net.specs == LAYERS


@pytest.mark.parametrize("input_shape,num_classes,match", [
    ((1, 6.5, 6), 3, "input_shape"),
    ((1, True, 6), 3, "input_shape"),
    ("166", 3, "input_shape"),
    (6, 3, "input_shape"),
    (SHAPE, "3", "num_classes"),
    (SHAPE, 3.0, "num_classes"),
])
def test_shape_and_classes_are_strict(input_shape, num_classes, match):
    with pytest.raises(TypeError, match=match):
        GloroNet(input_shape, num_classes, LAYERS)


# ---------------------------------------------------------------- 6: eps and lam

@pytest.mark.parametrize("bad", ["0.3", True, np.bool_(False), None, [0.3], np.array([0.3]), 1j])
def test_eps_type_is_strict(bad):
    with pytest.raises(TypeError, match="eps must be a real number"):
        GloroNet(SHAPE, 3, LAYERS, eps=bad)
    net = _net()
    if bad is not None:   # None means "the model's eps" in the evaluation API
        with pytest.raises(TypeError, match="eps must be a real number"):
            net.certify(_x(), eps=bad)
        with pytest.raises(TypeError, match="eps must be a real number"):
            net.gloro_logits(_x(), eps=bad)
        with pytest.raises(TypeError, match="eps must be a real number"):
            net.loss(_x(), np.zeros(4, np.int64), eps=bad)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, np.float32(-1)])
def test_eps_value_is_checked(bad):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        GloroNet(SHAPE, 3, LAYERS, eps=bad)


@pytest.mark.parametrize("good", [0, 1, 0.25, np.float32(0.25), np.float64(0.25), np.int64(1)])
def test_eps_real_numbers_accepted(good):
    net = GloroNet(SHAPE, 3, LAYERS, eps=good)
    assert type(net.eps) is float and net.eps == float(good)
    net.certify(_x(), eps=good)


def test_lam_is_strict():
    for bad in ("2", True, None):
        with pytest.raises(TypeError, match="lam must be a real number"):
            GloroNet(SHAPE, 3, LAYERS, lam=bad)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            GloroNet(SHAPE, 3, LAYERS, lam=bad)
    net = GloroNet(SHAPE, 3, LAYERS, lam=np.float32(2))
    assert type(net.lam) is float and net.lam == 2.0
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="lam must be a real number"):
        net.loss(_x(), y, loss="trades", lam="0.5")
    assert math.isfinite(float(net.loss(_x(), y, loss="trades", lam=np.float64(0.5)).item()))


# ---------------------------------------------------------------- 7: checkpoint meta

def _craft(path, meta_changes, arrays=None):
    """A checkpoint whose meta is a saved net's with ``meta_changes`` applied."""
    net = _net()
    src = path.parent / "src.npz"
    net.save(src)
    with np.load(src, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    meta.update(meta_changes)
    data["meta"] = np.array(json.dumps(meta))
    if arrays is not None:
        data = dict(arrays, meta=data["meta"])
    np.savez(path, **data)
    return str(path)


def test_huge_meta_shape_is_refused_before_allocating(tmp_path):
    import tracemalloc

    big = [1, 100000, 100000]  # iterate.0 alone would be 1e10 elements
    q = _craft(tmp_path / "big.npz", {"input_shape": big})
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"big\.npz.*'iterate\.0' has shape \(1, 1, 6, 6\), "
                                             r"expected \(1, 1, 100000, 100000\)"):
            gloro_core.load(q)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20
    # dense-only: the weight (10, 1e10) is what would be allocated
    q = _craft(tmp_path / "big2.npz", {"input_shape": big, "num_classes": 3,
                                        "layers": [{"type": "dense", "units": 3}]},
               arrays={"param.0.weight": np.zeros((3, 36), np.float32),
                       "param.0.bias": np.zeros(3, np.float32),
                       "iterate.0": np.zeros((1, 1, 6, 6), np.float32)})
    with pytest.raises(ValueError, match=r"big2\.npz.*'param\.0\.weight' has shape \(3, 36\)"):
        gloro_core.load(q)


@pytest.mark.parametrize("change,match", [
    ({"num_classes": "3"}, "num_classes"),
    ({"num_classes": 3.0}, "num_classes"),
    ({"layers": {"type": "dense", "units": 3}}, "layers"),
    ({"layers": "c(4,3,2)"}, "layers"),
    ({"layers": [1, 2]}, "layer 0"),
    ({"input_shape": 36}, "input_shape"),
    ({"input_shape": [1, 6.0, 6]}, "input_shape"),
    ({"input_shape": None}, "input_shape"),
    ({"eps": "0.1"}, "eps"),
    ({"lam": "1.0"}, "lam"),
    ({"activation": ["relu"]}, "activation"),
    ({"init": {"a": 1}}, "init"),
    ({"variant": None}, "variant"),
    ({"dtype": 5}, "dtype"),
    ({"power_iters": "5"}, "power_iters"),
    ({"seed": 0.5}, "seed"),
])
def test_bad_meta_values_are_clear_errors(tmp_path, change, match):
    q = _craft(tmp_path / "bad.npz", change)
    with pytest.raises(ValueError, match=r"bad\.npz: bad meta: .*" + match):
        gloro_core.load(q)


def test_crafted_meta_round_trip(tmp_path):
    q = _craft(tmp_path / "ok.npz", {})
    net = gloro_core.load(q)
    np.testing.assert_array_equal(net.logits(_x()), _net().logits(_x()))


# ---------------------------------------------------------------- 8: JSON output

def test_print_json_maps_non_finite_to_null(capsys):
    _print({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": np.float32("nan"), "e": -math.inf},
            "f": np.float64(2.0), "g": np.int64(3), "h": "x", "i": None, "j": True}, True, "t")
    out = _strict_json(capsys.readouterr().out)
    assert out == {"a": None, "b": [None, 1.5], "c": {"d": None, "e": None}, "f": 2.0, "g": 3,
                   "h": "x", "i": None, "j": True}


def test_certify_json_with_nothing_certified_is_strict_json(ckpt, capsys):
    assert main(["certify", ckpt, "--json", "--limit", "3", "--eps", "100"]) == 0
    res = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["certified_rate"] == 0.0 and res["radius_mean_certified"] is None
    assert res["radius_of_correct"]["mean"] is None or res["radius_of_correct"]["n"] > 0


def test_attack_and_lipschitz_json_are_strict_json(ckpt, capsys):
    assert main(["attack", ckpt, "--json", "--limit", "3", "--steps", "2"]) == 0
    assert _strict_json(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    assert main(["lipschitz", ckpt, "--json", "--limit", "4", "--pairs", "2", "--points", "2",
                 "--steps", "2"]) == 0
    assert _strict_json(capsys.readouterr().out.strip().splitlines()[-1])["points"] == 2


def test_certify_arrays_batch_is_checked():
    from gloro_core.cli import certify_arrays

    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            certify_arrays(_net(), _x(), np.zeros(4, np.int64), 0.1, batch=bad)
    assert certify_arrays(_net(), _x(), np.zeros(4, np.int64), 0.1, batch=np.int64(3))[0]["n"] == 4

"""gloro-npz/1 files written before the layer classes (commit b45bcc8, by
data/make_legacy_checkpoints.py) load to bit-identical logits, certificates and bounds.

Compared on the numpy backend: the expected values came from its kernels, which are
unchanged since. The CPU defaults have changed since (batched convs on the numba backend,
whose GEMMs for the first layers sum in another order), so the default path rounds some
logits differently in the last bit; that says nothing about the file format."""
import json
import os

import numpy as np
import pytest

import gloro_core
from kernels import registry

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.mark.parametrize("name", ["legacy_relu", "legacy_minmax"])
def test_legacy_checkpoint_is_bit_identical(name):
    with registry.default_backend("numpy"):
        _check(name)


def _check(name):
    net = gloro_core.load(os.path.join(DATA, name + ".npz"))
    x = np.load(os.path.join(DATA, name + ".x.npy"))
    with open(os.path.join(DATA, name + ".json")) as fh:
        ref = json.load(fh)
    with np.load(os.path.join(DATA, name + ".expected.npz")) as z:
        expected = {k: z[k] for k in z.files}
    assert net.eps == ref["eps"]
    np.testing.assert_array_equal(net.logits(x), expected["logits"])
    np.testing.assert_array_equal(net.gloro_logits(x), expected["gloro_logits"])
    for bound in ("provable", "power"):
        for tight in (True, False):
            pred, radius = net.certify(x, bound=bound, tight_radius=tight)
            np.testing.assert_array_equal(pred, expected[f"pred_{bound}_{int(tight)}"])
            np.testing.assert_array_equal(radius, expected[f"radius_{bound}_{int(tight)}"])
    lip = net.lipschitz()
    assert lip["k_sub_provable"] == ref["lipschitz"]["k_sub_provable"]
    assert lip["k_sub_power"] == ref["lipschitz"]["k_sub_power"]
    assert lip["layers"] == ref["lipschitz"]["layers"]

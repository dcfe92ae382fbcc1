"""Writes the legacy gloro-npz/1 fixtures that tests/gloro_core/test_legacy_checkpoints.py loads.

Run once with the code of commit b45bcc8 (before the layer classes of issue 12):
``python tests/gloro_core/data/make_legacy_checkpoints.py``. For each net: ``<name>.npz``
(the checkpoint), ``<name>.x.npy`` (float64 inputs: the cast to float32 is part of the
rounding bound), ``<name>.expected.npz`` (logits, GloRo logits, predictions and radii)
and ``<name>.json`` (the Lipschitz report and the eps used).
"""
import json
import os

import numpy as np

from gloro_core.model import GloroNet

HERE = os.path.dirname(os.path.abspath(__file__))

NETS = {
    "legacy_relu": dict(input_shape=(1, 6, 6), num_classes=3, activation="relu", variant="margin",
                        layers=[{"type": "conv", "filters": 4, "kernel": 3, "stride": 2, "padding": "same"},
                                {"type": "dense", "units": 8}, {"type": "dense", "units": 3}]),
    "legacy_minmax": dict(input_shape=(2, 5, 5), num_classes=4, activation="minmax", variant="basic",
                          layers=[{"type": "conv", "filters": 4, "kernel": 3, "stride": 1, "padding": "valid"},
                                  {"type": "dense", "units": 4}]),
}


def main():
    for k, (name, cfg) in enumerate(NETS.items()):
        net = GloroNet(cfg["input_shape"], cfg["num_classes"], cfg["layers"], activation=cfg["activation"],
                       variant=cfg["variant"], eps=0.05, seed=k + 1)
        rng = np.random.default_rng(k + 10)
        for _, b in net.params:
            b.data[:] = rng.normal(0, 0.1, b.shape)
        x = rng.random((12,) + tuple(cfg["input_shape"]))
        net.loss(x, rng.integers(0, cfg["num_classes"], 12), power_iters=3)   # moves the iterates
        net.save(os.path.join(HERE, name + ".npz"))
        expected = {"logits": net.logits(x), "gloro_logits": net.gloro_logits(x)}
        for bound in ("provable", "power"):
            for tight in (True, False):
                pred, radius = net.certify(x, bound=bound, tight_radius=tight)
                expected[f"pred_{bound}_{int(tight)}"] = pred
                expected[f"radius_{bound}_{int(tight)}"] = radius
        np.save(os.path.join(HERE, name + ".x.npy"), x)
        np.savez(os.path.join(HERE, name + ".expected.npz"), **expected)
        with open(os.path.join(HERE, name + ".json"), "w") as fh:
            json.dump({"eps": net.eps, "lipschitz": net.lipschitz()}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()

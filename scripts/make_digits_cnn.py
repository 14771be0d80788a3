"""Train the small digits CNN and export it to ONNX.

Trains on scikit-learn's bundled 8x8 handwritten digits (no download), with a
fixed 70/30 split, fixed seeds and deterministic CPU kernels, then writes

* ``models/digits_cnn.onnx``: opset 17, input ``image`` float32
  ``[batch, 1, 8, 8]`` (pixels in [0, 1]), output ``logits`` float32
  ``[batch, 10]``; BatchNorm is folded into the convolutions at export;
* ``models/digits_test.npz``: the held-out split, ``x`` float32
  ``[N, 1, 8, 8]`` and ``y`` int64 ``[N]``;

and prints the test accuracy measured with onnxruntime on the written file.

Usage: ``python scripts/make_digits_cnn.py [--out-dir DIR] [--epochs N]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodels

SEED = 0
OPSET = 17


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks, one 2x2 max-pool and a two-layer classifier head.

    ``[B, 1, 8, 8]`` -> conv(32)+BN+ReLU -> conv(64)+BN+ReLU -> maxpool ->
    conv(64)+BN+ReLU -> flatten(1024) -> linear(64)+ReLU -> dropout ->
    linear(10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: the same float summation order on every machine.
    torch.set_num_threads(1)


def train(x_tr: np.ndarray, y_tr: np.ndarray, epochs: int, batch_size: int = 32) -> DigitsCNN:
    """Train with AdamW and a one-cycle learning-rate schedule; small random
    shifts of up to one pixel augment the training images."""
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            xb = _random_shift(xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")
    model.eval()
    return model


def _random_shift(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixels in each direction (zero fill)."""
    padded = nn.functional.pad(xb, (1, 1, 1, 1))
    offs = torch.randint(0, 3, (len(xb), 2), generator=gen)
    return torch.stack(
        [padded[j, :, dy : dy + 8, dx : dx + 8] for j, (dy, dx) in enumerate(offs.tolist())]
    )


def _name_folded_weights(m: onnx.ModelProto) -> None:
    """Name the BN-folded convolution weights after their layer.

    Folding gives them generated names; a Conv node called
    ``/features/features.0/Conv`` gets ``features.0.weight`` and
    ``features.0.bias``.
    """
    inits = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "Conv":
            continue
        layer = node.name.strip("/").split("/")[-2]  # e.g. "features.0"
        for i, suffix in ((1, "weight"), (2, "bias")):
            old = node.input[i] if i < len(node.input) else ""
            new = f"{layer}.{suffix}"
            if old.startswith("onnx::") and old in inits and new not in inits:
                inits[old].name = new
                inits[new] = inits.pop(old)
                node.input[i] = new


def export(model: DigitsCNN, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, 8, 8)
    # The TorchScript exporter is chosen on purpose (dynamo=False); silence its
    # deprecation notice.
    warnings.filterwarnings(
        "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
    )
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(str(path))
    _name_folded_weights(m)
    m.doc_string = "Small CNN for 8x8 digits; made by scripts/make_digits_cnn.py"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=realmodels.MODELS_DIR)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    t0 = time.perf_counter()
    set_determinism(SEED)
    x_tr, x_te, y_tr, y_te = realmodels.digits_split()
    print(f"train {len(x_tr)}  test {len(x_te)}")
    model = train(x_tr, y_tr, args.epochs)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters (torch, before BN folding): {n_params}")

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_te)).numpy()
    torch_acc = float(np.mean(torch_logits.argmax(1) == y_te))

    onnx_path = args.out_dir / "digits_cnn.onnx"
    test_path = args.out_dir / "digits_test.npz"
    export(model, onnx_path)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(test_path, x=x_te.astype(np.float32), y=y_te.astype(np.int64))

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {"image": x_te})[0]
    max_diff = float(np.max(np.abs(ort_logits - torch_logits)))
    if test_path.resolve() == realmodels.DIGITS_TEST_PATH.resolve():
        realmodels.digits_test_set.cache_clear()
        acc = realmodels.digits_accuracy(sess)
    else:
        acc = float(np.mean(ort_logits.argmax(1) == y_te))
    onnx_params = sum(
        int(np.prod(init.dims)) for init in onnx.load(str(onnx_path)).graph.initializer
    )
    ops = sorted({n.op_type for n in onnx.load(str(onnx_path)).graph.node})
    print(f"onnx ops: {ops}")
    print(f"onnx initializer elements (BN folded): {onnx_params}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes)")
    print(f"wrote {test_path} ({test_path.stat().st_size} bytes)")
    print(f"torch vs onnxruntime max |logit diff|: {max_diff:.3e}")
    print(f"fp32 test accuracy (torch):       {torch_acc:.4f}")
    print(f"fp32 test accuracy (onnxruntime): {acc:.4f}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

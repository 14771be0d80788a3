"""Make realistic version pairs of the digits CNN for benchmarking model updates.

Everything starts from scikit-learn's bundled 8x8 digits (no download) and the same 70/30 split
as ``models/digits_cnn.onnx`` (``realmodels.digits_split``); one CPU thread, fixed seeds,
deterministic kernels. Written:

``models/updates/digits_cnn_v2.onnx``
    the bundled ``models/digits_cnn.onnx`` (v1) trained further on augmented images (random
    shifts of up to one pixel, small rotations and scaling, pixel noise): its weights are read
    back from the ONNX file (BatchNorm is already folded into the convolutions there), so v1 is
    the bundled file bit for bit and every tensor moves a little, as in a fine-tune.
``models/updates/digits_cnn_v3.onnx``
    v2 trained further again (a chain v1 -> v2 -> v3), with stronger noise.
``models/updates/digits8_cnn.onnx`` and ``models/updates/digits10_head.onnx``
    a head replaced for new classes: v1 is the same CNN trained on digits 0..7 only; v2 keeps
    its convolutions frozen (bit-identical), fine-tunes the first dense layer, and replaces the
    head by a new hidden layer and a 10-class output, so ``classifier.4`` is reshaped
    (``[8, 64]`` -> ``[64, 64]``), ``classifier.6`` is new and the graph has new nodes.
``build/updates/fedavg/round-XX.onnx`` + ``rounds.json``
    a federated run: round 0 is the CNN trained centrally on 10% of the training images (the
    server's own data); then ``--rounds`` (default 12) rounds of FedAvg over 5 simulated
    clients that hold the other 90%, split by label with a Dirichlet(0.5) draw (non-IID); each
    client runs one local epoch of SGD from the global model, the server averages the weights
    by client size and ships the new global model. ``rounds.json`` has each round's test
    accuracy. Each client's local model of each round is kept too (``clients/``), for the
    uplink: a client sends its model as an update against the global model it received.
    (13 + 60 models of 490 KB: made here, not committed.)

The accuracy of every model on ``models/digits_test.npz`` is printed (onnxruntime, fp32).

Usage: ``python scripts/make_update_pairs.py [--only digits,head,fedavg] [--rounds N]``
Needs torch (the ``bench`` extra); about a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodels  # noqa: E402
import updatepairs as up  # noqa: E402

OPSET = 17
ALPHA = 0.5  # Dirichlet concentration of the label split over clients (non-IID)
LOCAL_EPOCHS = 3


class FoldedDigitsCNN(nn.Module):
    """The digits CNN of ``make_digits_cnn.py`` with BatchNorm folded into the convolutions, as
    it is stored in the ONNX file. Module indices match the file's tensor names
    (``features.0/3/7``, ``classifier.1/4``). ``head`` = extra hidden width of a replaced head
    (0: the original ``Linear(64, classes)`` at ``classifier.4``)."""

    def __init__(self, classes: int = 10, head: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.Identity(), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.Identity(), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.Identity(), nn.ReLU(),
        )
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Dropout(0.25)]
        if head:
            layers += [nn.Linear(64, head), nn.ReLU(), nn.Linear(head, classes)]
        else:
            layers += [nn.Linear(64, classes)]
        self.classifier = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def set_determinism(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_onnx_weights(model: nn.Module, path: Path) -> None:
    """Load an ONNX file's initializers into ``model`` by name (strict)."""
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
             for t in onnx.load(str(path)).graph.initializer}
    missing, unexpected = model.load_state_dict(inits, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{path}: weights do not match the model: missing {missing}, "
                         f"unexpected {unexpected}")


def export(model: nn.Module, path: Path, doc: str) -> None:
    """TorchScript export (opset 17, input ``image``, output ``logits``, dynamic batch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                      opset_version=OPSET, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
    m = onnx.load(str(path))
    m.doc_string = doc
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def augment(xb: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Random affine (rotation up to 12*strength degrees, scale 1 +- 0.1*strength, shift up
    to one pixel) and Gaussian pixel noise of sigma 0.05*strength, clipped to [0, 1]."""
    n = len(xb)
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12 * strength)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1 * strength
    shift = (torch.randint(0, 3, (n, 2), generator=gen).float() - 1) * (2 / 8)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(xb.shape), align_corners=False)
    out = nn.functional.grid_sample(xb, grid, align_corners=False, padding_mode="zeros")
    out = out + torch.randn(out.shape, generator=gen) * 0.05 * strength
    return out.clamp(0, 1)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
          seed: int, strength: float, params=None, sgd: bool = False,
          batch_size: int = 32) -> None:
    """Train in place: AdamW with a cosine schedule (or plain SGD for federated clients)."""
    params = list(model.parameters()) if params is None else list(params)
    if sgd:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        sched = None
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(xt[idx], gen, strength) if strength > 0 else xt[idx]
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()


def make_digits(x_tr: np.ndarray, y_tr: np.ndarray) -> None:
    set_determinism(1)
    model = FoldedDigitsCNN()
    load_onnx_weights(model, up.DIGITS_V1)
    train(model, x_tr, y_tr, epochs=8, lr=5e-4, seed=1, strength=1.0)
    export(model, up.DIGITS_V2, "Digits CNN v2: models/digits_cnn.onnx trained 8 more epochs on "
           "augmented images; made by scripts/make_update_pairs.py")
    set_determinism(2)
    train(model, x_tr, y_tr, epochs=6, lr=3e-4, seed=2, strength=1.5)
    export(model, up.DIGITS_V3, "Digits CNN v3: v2 trained 6 more epochs on stronger "
           "augmentation; made by scripts/make_update_pairs.py")
    for p in (up.DIGITS_V1, up.DIGITS_V2, up.DIGITS_V3):
        print(f"{p.relative_to(up.ROOT)}: accuracy {up.digits_accuracy(p):.4f}")


def make_head(x_tr: np.ndarray, y_tr: np.ndarray) -> None:
    set_determinism(3)
    keep = y_tr < 8
    v1 = FoldedDigitsCNN(classes=8)
    train(v1, x_tr[keep], y_tr[keep], epochs=20, lr=3e-3, seed=3, strength=0.5)
    export(v1, up.HEAD_V1, "Digits CNN for digits 0..7 only; made by scripts/make_update_pairs.py")
    set_determinism(4)
    v2 = FoldedDigitsCNN(classes=10, head=64)
    sd = {k: v for k, v in v1.state_dict().items() if not k.startswith("classifier.4")}
    v2.load_state_dict(sd, strict=False)
    for p in v2.features.parameters():
        p.requires_grad_(False)
    train(v2, x_tr, y_tr, epochs=10, lr=2e-3, seed=4, strength=0.5,
          params=[p for p in v2.parameters() if p.requires_grad])
    export(v2, up.HEAD_V2, "Digits CNN for 10 digits: the 8-class model's convolutions frozen, "
           "a new two-layer head; made by scripts/make_update_pairs.py")
    print(f"{up.HEAD_V1.relative_to(up.ROOT)}: accuracy on digits 0..7 "
          f"{up.digits8_accuracy(up.HEAD_V1):.4f}")
    print(f"{up.HEAD_V2.relative_to(up.ROOT)}: accuracy on 10 digits "
          f"{up.digits_accuracy(up.HEAD_V2):.4f}")


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Indices of each client: every label's images are dealt out by a Dirichlet draw."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
        for c, chunk in enumerate(np.split(idx, cuts)):
            parts[c].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def make_fedavg(x_tr: np.ndarray, y_tr: np.ndarray, rounds: int, clients: int = 5) -> None:
    set_determinism(5)
    rng = np.random.default_rng(5)
    order = rng.permutation(len(x_tr))
    n_server = len(x_tr) // 5
    server, rest = order[:n_server], order[n_server:]
    glob = FoldedDigitsCNN()
    train(glob, x_tr[server], y_tr[server], epochs=15, lr=3e-3, seed=5, strength=0.5)
    split = dirichlet_split(y_tr[rest], clients, ALPHA, seed=5)
    split = [rest[s] for s in split]
    folder = up.FEDAVG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    info: dict = {"clients": [int(len(s)) for s in split], "server_images": int(n_server),
                  "local_epochs": LOCAL_EPOCHS, "optimizer": "AdamW lr 2e-3 cosine to 0 within the round, batch 32",
                  "dirichlet_alpha": ALPHA, "rounds": []}

    def ship(r: int) -> None:
        path = folder / f"round-{r:02d}.onnx"
        export(glob, path, f"Digits CNN, FedAvg global model after round {r}; made by "
               "scripts/make_update_pairs.py")
        acc = up.digits_accuracy(path)
        info["rounds"].append({"round": r, "file": path.name, "accuracy": acc})
        print(f"round {r:2d}: accuracy {acc:.4f}")

    ship(0)
    for r in range(1, rounds + 1):
        states, sizes, client_files = [], [], []
        for c, idx in enumerate(split):
            local = FoldedDigitsCNN()
            local.load_state_dict(glob.state_dict())
            train(local, x_tr[idx], y_tr[idx], epochs=LOCAL_EPOCHS, lr=2e-3, seed=1000 * r + c,
                  strength=0.5)
            states.append(local.state_dict())
            sizes.append(len(idx))
            cpath = folder / "clients" / f"round-{r:02d}-client-{c}.onnx"
            export(local, cpath, f"Digits CNN, client {c}'s local model in FedAvg round {r} "
                   "(trained from the round's global model); made by "
                   "scripts/make_update_pairs.py")
            client_files.append(f"clients/{cpath.name}")
        w = np.array(sizes, dtype=np.float64) / sum(sizes)
        avg = {k: sum(float(wi) * s[k].double() for wi, s in zip(w, states)).float()
               for k in states[0]}
        glob.load_state_dict(avg)
        ship(r)
        info["rounds"][-1]["clients"] = client_files
        info["rounds"][-1]["client_weights"] = [float(x) for x in w]
    (folder / "rounds.json").write_text(json.dumps(info, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="digits,head,fedavg",
                    help="comma-separated: digits, head, fedavg")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    what = set(args.only.split(","))
    t0 = time.perf_counter()
    x_tr, _, y_tr, _ = realmodels.digits_split()
    if "digits" in what:
        make_digits(x_tr, y_tr)
    if "head" in what:
        make_head(x_tr, y_tr)
    if "fedavg" in what:
        make_fedavg(x_tr, y_tr, args.rounds)
    print(f"total time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

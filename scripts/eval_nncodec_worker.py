"""Run NNCodec on a set of float32 tensors; meant for the venv that ``evaluate.py`` makes.

Usage (with the venv's python)::

    build/nncodec-venv/bin/python scripts/eval_nncodec_worker.py IN.npz OUT_DIR QP [QP ...]
    build/nncodec-venv/bin/python scripts/eval_nncodec_worker.py --version

For each quantization parameter it encodes every tensor of ``IN.npz`` with NNCodec's defaults
for a dict of parameters (``nncodec.nn.encode``), decodes the bitstream, writes the decoded
tensors to ``OUT_DIR/qp<QP>.npz`` and prints one JSON line: ``qp``, ``bitstream_bytes``,
``encode_s``, ``decode_s``, ``file``.

torchvision on PyPI is built against CUDA torch and cannot load next to the CPU torch this
venv has; NNCodec imports it only for its training data sets, so a stand-in module takes its
place before NNCodec is imported. Needs only numpy and nncodec (this script imports nothing
from the project).
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path


class _Placeholder(types.ModuleType):
    """Any attribute is another placeholder; usable as a base class and callable."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _Placeholder(f"{self.__name__}.{name}")
        setattr(self, name, sub)
        return sub

    def __call__(self, *args, **kwargs):
        return self

    def __mro_entries__(self, bases):
        return (object,)


def _import_nncodec():
    sys.modules.setdefault("torchvision", _Placeholder("torchvision"))
    from nncodec import nn as nnc_nn

    return nnc_nn


def main(argv: list[str]) -> int:
    if argv[:1] == ["--version"]:
        _import_nncodec()
        from importlib.metadata import version

        print(f"nncodec {version('nncodec')}, torch {version('torch')}")
        return 0
    import numpy as np

    src, out_dir, qps = Path(argv[0]), Path(argv[1]), [int(q) for q in argv[2:]]
    nnc_nn = _import_nncodec()
    with np.load(src) as data:
        params = {k: np.ascontiguousarray(data[k], np.float32) for k in data.files}
    for qp in qps:
        args = {"qp": qp, "results": str(out_dir), "verbose": False}
        t0 = time.perf_counter()
        bitstream = nnc_nn.encode(params, args=args)
        t1 = time.perf_counter()
        decoded = nnc_nn.decode(bitstream, args=args)
        t2 = time.perf_counter()
        name = f"qp{qp}.npz"
        np.savez(out_dir / name, **{k: np.asarray(decoded[k], np.float32) for k in params})
        print(json.dumps({"qp": qp, "bitstream_bytes": len(bitstream), "encode_s": t1 - t0,
                          "decode_s": t2 - t1, "file": name}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""restore / inspect / verify: what a user does with a package (encoder side: needs onnx)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .encoder import weights_digest
from .errors import FormatError, IntegrityError, P2UError
from .format import AtomicFile, check_file_entry, load_manifest, read_stage, stage_file_name
from .reconstruct import WeightState

__all__ = ["restore", "inspect", "verify", "open_stages"]

_PROTOBUF_LIMIT = 2**31 - 1


def _stage_index(manifest: dict[str, Any], stage: int | None) -> int:
    n = len(manifest["stages"])
    if stage is None:
        return n - 1
    if not 0 <= stage < n:
        raise P2UError(f"stage {stage} does not exist: this package has stages 0..{n - 1}")
    return stage


def _check_file(package: Path, f: dict[str, Any]) -> Path:
    return check_file_entry(package / f["path"], f, digest=False)


def _check_base_digests(package: Path, manifest: dict[str, Any]) -> None:
    """base.onnx and base.bin are there, with the sizes and sha256 the manifest lists."""
    for f in manifest["base_model"]["files"]:
        check_file_entry(package / f["path"], f)


def open_stages(package: str | os.PathLike, until: int | None = None) -> WeightState:
    """A :class:`WeightState` advanced through stages 1..``until`` of a package directory."""
    package = Path(package)
    manifest = load_manifest(package)
    until = _stage_index(manifest, until)
    for f in manifest["base_model"]["files"]:
        _check_file(package, f)
    state = WeightState(manifest, package / "base.bin")
    for k in range(1, until + 1):
        f = manifest["stages"][k]["files"][0]
        sf = read_stage(_check_file(package, f), package_id=manifest["package_id"], stage=k,
                        sha256=f["sha256"])
        state.apply(sf)
    return state


def load_stage_model(package: str | os.PathLike, stage: int | None = None) -> onnx.ModelProto:
    """The ONNX model of a stage, all data in memory."""
    package = Path(package)
    manifest = load_manifest(package)
    stage = _stage_index(manifest, stage)
    if stage == 0:
        _check_base_digests(package, manifest)
        return onnx.load(str(package / "base.onnx"), load_external_data=True)
    return _filled_model(open_stages(package, stage))


def _filled_model(state: WeightState) -> onnx.ModelProto:
    """The skeleton graph of ``state`` with every external tensor filled in from memory: coded
    weights from the state, the rest from ``base.bin`` (no weights.bin written and read back)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load_model_from_string(state.graph_bytes or b"")
    coded = {t["weights"][0]: name for name, t in state.tensors.items()}
    base = state.base_bin
    for t in _all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        off, length = int(info.offset or 0), info.length
        if info.location == "weights.bin" and off in coded:
            data = state.weight(coded[off]).tobytes()
        elif info.location == "base.bin" and length is not None and off + length <= len(base):
            data = base[off:off + length].tobytes()
        else:
            raise FormatError(f"tensor {t.name} of the skeleton graph points at "
                              f"{info.location}[{off}:+{length}], which the package does not hold")
        if length is not None and len(data) != int(length):
            raise FormatError(f"tensor {t.name}: {len(data)} bytes where the graph says {length}")
        t.raw_data = data
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model


def restore(package: str | os.PathLike, output: str | os.PathLike,
            stage: int | None = None) -> Path:
    """Write the model of ``stage`` (default: the last) of ``package`` to ``output``.

    >>> restore("model.p2u", "model_s1.onnx", stage=1)  # doctest: +SKIP

    Models over 2 GB are written with their tensors in ``<output>.data`` beside it.
    """
    model = load_stage_model(package, stage)
    out = Path(output)
    # ByteSize() itself fails past 2 GB: count the tensor bytes instead
    size = sum(len(t.raw_data) for t in _all_tensors(model))
    if size < _PROTOBUF_LIMIT - (64 << 20):
        with AtomicFile(out) as f:
            f.write(model.SerializeToString())
        return out
    # past the protobuf limit: tensors in <output>.data, both files renamed into place
    data = out.with_name(out.name + ".data")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx.save_model(model, str(tmp / out.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name)
        os.replace(tmp / data.name, data)
        os.replace(tmp / out.name, out)
    except OSError as e:
        raise P2UError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _all_tensors(model: onnx.ModelProto):
    from .graph import iter_slots

    return (s.tensor for s in iter_slots(model))


def inspect(package: str | os.PathLike, tensors: bool = False) -> dict[str, Any]:
    """Per-stage table of a package: bits, bytes, share of the original, max error.

    With ``tensors``, also ``tensor_table``: per coded tensor its base bits, layout, size and
    estimated share of the base's output error.
    """
    manifest = load_manifest(package)
    src = manifest["source"]
    # shares are of the fp32-equivalent bytes (what --budget and --cap are shares of)
    orig = src.get("fp32_equivalent_bytes") or src.get("weight_bytes") or 1
    # the mix of bits per coded weight at each lossy stage (the plan says the base's default)
    sizes = [(int(np.prod(t["shape"], dtype=np.int64)), t["bits"]) for t in manifest["tensors"]]
    n_coded = sum(n for n, _ in sizes)
    mean0 = sum(n * b for n, b in sizes) / n_coded if n_coded else None
    rows = []
    for st in manifest["stages"]:
        lossy = mean0 is not None and isinstance(st["bits"], int)
        rows.append({
            "stage": st["index"], "bits": st["bits"], "bytes": st["bytes"],
            "mean_bits": mean0 + st["bits"] - manifest["stages"][0]["bits"] if lossy else None,
            "cumulative_bytes": st["cumulative_bytes"],
            "share": st["bytes"] / orig, "cumulative_share": st["cumulative_bytes"] / orig,
            "max_abs_error": st["max_abs_error"], "max_rel_error": st["max_rel_error"],
        })
    return {
        "package": str(package), "package_id": manifest["package_id"],
        "format_version": manifest["format_version"], "source": src,
        "plan": manifest["plan"], "config": manifest.get("config", {}),
        "base_opset": manifest["base_model"].get("opset"),
        "tensors": len(manifest["tensors"]), "stages": rows,
        "allocation": manifest.get("allocation"), "notes": manifest.get("notes", []),
        **({"tensor_table": [
            {"name": t["name"], "bits": t["bits"], "layout": t["layout"], "dtype": t["dtype"],
             "size": int(np.prod(t["shape"], dtype=np.int64)), "est_error": t.get("est_error")}
            for t in manifest["tensors"]]} if tensors else {}),
    }


def verify(package: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest and replay every stage.

    For a plan that ends lossless, the restored weights must hash to the source digest. Raises
    :class:`IntegrityError` / :class:`FormatError` naming the first problem.
    """
    package = Path(package)
    manifest = load_manifest(package)
    _check_base_digests(package, manifest)
    try:
        onnx.checker.check_model(str(package / "base.onnx"))
    except Exception as e:
        raise FormatError(f"{package / 'base.onnx'}: not a valid ONNX model ({e})") from e
    read_stage(_check_file(package, manifest["stages"][0]["files"][0]),
               package_id=manifest["package_id"], stage=0,
               sha256=manifest["stages"][0]["files"][0]["sha256"])
    last = len(manifest["stages"]) - 1
    result = {"package": str(package), "stages": last + 1, "lossless_match": None}
    if last >= 1:
        state = open_stages(package, last)
        if manifest["plan"][-1] == "lossless":
            digest = weights_digest(_filled_model(state))
            if digest != manifest["source"]["weights_sha256"]:
                raise IntegrityError(f"{package}: the lossless stage does not reproduce the "
                                     "source weights")
            result["lossless_match"] = True
    return result


def stage_path(package: str | os.PathLike, index: int) -> Path:
    return Path(package) / stage_file_name(index)

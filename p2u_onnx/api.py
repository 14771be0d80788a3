"""restore / inspect / verify: what a user does with a package (encoder side: needs onnx)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .encoder import weights_digest
from .errors import FormatError, IntegrityError, P2UError
from .external import check_base_graph
from .format import (AtomicFile, check_file_entry, is_update, load_manifest, package_file,
                     read_stage, stage_file_name)
from .reconstruct import WeightState, extract_file
from .trust import Policy, TrustSpec, read_manifest_bytes, read_signature

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
    return check_file_entry(package_file(package, f["path"]), f, digest=False)


def _base_size(manifest: dict[str, Any], name: str) -> int:
    return next(f["size"] for f in manifest["base_model"]["files"] if f["path"] == name)


def _check_base_digests(package: Path, manifest: dict[str, Any]) -> None:
    """base.onnx and base.bin are there, with the sizes and sha256 the manifest lists, and
    base.onnx's external data points only where the manifest says (checked before onnx or
    onnxruntime open it)."""
    for f in manifest["base_model"]["files"]:
        check_file_entry(package_file(package, f["path"]), f)
    check_base_graph(package / "base.onnx", manifest, _base_size(manifest, "base.bin"),
                     str(package / "base.onnx"))


def _onnx_error(what: str, e: Exception) -> FormatError:
    """A raw onnx / onnxruntime / protobuf exception as one line."""
    text = " ".join(str(e).split())
    return FormatError(f"{what}: {text[:300] or type(e).__name__}")


def _checked_manifest(package: Path, expect: str | None, trust: TrustSpec | None
                      ) -> tuple[dict[str, Any], bytes]:
    """The manifest of a package folder and its exact bytes; with ``expect`` / ``trust``,
    checked against the pin (before parsing) and the signature (see :mod:`p2u_onnx.trust`).
    No version state is read or written here."""
    raw = read_manifest_bytes(package)
    manifest = Policy.make(expect, trust).admit(raw, str(package / "manifest.json"),
                                                lambda: read_signature(package))
    return manifest, raw


def open_stages(package: str | os.PathLike, until: int | None = None, *,
                manifest: dict[str, Any] | None = None) -> WeightState:
    """A :class:`WeightState` advanced through stages 1..``until`` of a package directory
    (``manifest``: the package's, when already read and checked)."""
    package = Path(package)
    manifest = load_manifest(package) if manifest is None else manifest
    until = _stage_index(manifest, until)
    for f in manifest["base_model"]["files"]:
        _check_file(package, f)
    # the tensor table against base.onnx, before anything is decoded
    check_base_graph(package / "base.onnx", manifest, _base_size(manifest, "base.bin"),
                     str(package / "base.onnx"))
    state = WeightState(manifest, package / "base.bin")
    state.base_onnx = package / "base.onnx"  # checked above; a format-4 graph is coded on it
    for k in range(1, until + 1):
        f = manifest["stages"][k]["files"][0]
        sf = read_stage(_check_file(package, f), package_id=manifest["package_id"], stage=k,
                        sha256=f["sha256"], manifest=manifest)
        state.apply(sf)
    return state


def load_stage_model(package: str | os.PathLike, stage: int | None = None, *,
                     manifest: dict[str, Any] | None = None) -> onnx.ModelProto:
    """The ONNX model of a stage, all data in memory."""
    package = Path(package)
    manifest = load_manifest(package) if manifest is None else manifest
    stage = _stage_index(manifest, stage)
    if stage == 0:
        _check_base_digests(package, manifest)
        return _base_model(package)
    return _filled_model(open_stages(package, stage, manifest=manifest))


def _base_model(package: Path) -> onnx.ModelProto:
    """``base.onnx`` of a checked package (:func:`_check_base_digests`), parsed from bytes,
    every external tensor's bytes read from ``base.bin`` by p2u itself. onnx's external-data
    loader is never used: the spans were checked by p2u, and its hard-link guard refuses a
    package a user copied with ``cp -al``."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from .format import open_regular

    where = package / "base.onnx"
    try:
        with open_regular(where) as f:
            model = onnx.load_model_from_string(f.read())
    except OSError as e:
        raise FormatError(f"cannot read {where}: {e.strerror or e}") from e
    except Exception as e:  # protobuf's DecodeError on a hostile file
        raise _onnx_error(f"{where}: cannot be loaded", e) from e
    try:
        with open_regular(package / "base.bin") as f:
            for t in _all_tensors(model):
                if not uses_external_data(t):
                    continue
                info = ExternalDataInfo(t)  # location and span checked by check_base_graph
                data = os.pread(f.fileno(), int(info.length), int(info.offset or 0))
                if len(data) != int(info.length):
                    raise IntegrityError(f"{package / 'base.bin'} is shorter than "
                                         f"{where} says (tensor {t.name})")
                t.raw_data = data
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
    except OSError as e:
        raise FormatError(f"cannot read {package / 'base.bin'}: {e.strerror or e}") from e
    return model


def _filled_model(state: WeightState) -> onnx.ModelProto:
    """The skeleton graph of ``state`` with every external tensor filled in from memory: coded
    weights from the state, the rest from ``base.bin`` (no weights.bin written and read back)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load_model_from_string(state.graph_bytes or b"")
    except Exception as e:  # protobuf's DecodeError on a hostile skeleton
        raise _onnx_error("graph.onnx (stage 1) is not a valid ONNX model", e) from e
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
            stage: int | None = None, *, expect: str | None = None,
            trust: TrustSpec | None = None) -> Path:
    """Write the model of ``stage`` (default: the last) of ``package`` to ``output``.

    >>> restore("model.p2u", "model_s1.onnx", stage=1)  # doctest: +SKIP

    Models over 2 GB are written with their tensors in ``<output>.data`` beside it.
    ``expect`` (``"sha256:<hex>"`` of ``manifest.json``) and ``trust`` (public keys) refuse a
    package that is not pinned or signed as asked (:class:`~p2u_onnx.errors.TrustError`) before
    anything is written; versions are not checked or recorded (see :mod:`p2u_onnx.trust`).
    """
    package = Path(package)
    manifest = _checked_manifest(package, expect, trust)[0]
    if is_update(manifest):
        raise P2UError(f"{package} is an update: it applies to "
                       f"{_pred_text(manifest['predecessor'])}; give that with --from")
    return _write_model(load_stage_model(package, stage, manifest=manifest), output)


def _pred_text(pred: dict[str, Any]) -> str:
    from .updates import _describe_pred

    return _describe_pred(pred)


def _write_model(model: onnx.ModelProto, output: str | os.PathLike) -> Path:
    """Write ``model`` to ``output`` atomically (over 2 GB: tensors in ``<output>.data``)."""
    out = Path(output)
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise P2UError(f"cannot write {out}: folder {out.parent} {what}")
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


def inspect(package: str | os.PathLike, tensors: bool = False, *, expect: str | None = None,
            trust: TrustSpec | None = None) -> dict[str, Any]:
    """Per-stage table of a package: bits, bytes, share of the original, max error.

    Each stage row says whether its file is ``present`` in the folder (a regular file of the
    listed size; not hashed: see :func:`verify`); ``notes`` names the missing ones. With
    ``tensors``, also ``tensor_table``: per coded tensor its base bits, layout, size and
    estimated share of the base's output error. ``expect`` / ``trust``: as for :func:`verify`.
    """
    manifest = _checked_manifest(Path(package), expect, trust)[0]
    src = manifest["source"]
    # shares are of the fp32-equivalent bytes (what --budget and --cap are shares of)
    orig = src.get("fp32_equivalent_bytes") or src.get("weight_bytes") or 1
    # the mix of bits per coded weight at each lossy stage (the plan says the base's default)
    sizes = [(int(np.prod(t["shape"], dtype=np.int64)), t["bits"]) for t in manifest["tensors"]
             if "bits" in t]  # (an update's unchanged tensors have none)
    n_coded = sum(n for n, _ in sizes)
    mean0 = sum(n * b for n, b in sizes) / n_coded if n_coded else None
    rows = []
    missing = []
    for st in manifest["stages"]:
        size = st.get("bytes", st["files"][0]["size"])
        cum = st.get("cumulative_bytes", size)
        present = all(_present(Path(package), f) for f in st["files"])
        if not present:
            missing.append(st["files"][0]["path"])
        lossy = mean0 is not None and isinstance(st.get("bits"), int) \
            and isinstance(manifest["stages"][0].get("bits"), int)
        rows.append({
            "stage": st["index"], "bits": st.get("bits"), "bytes": size,
            "mean_bits": mean0 + st["bits"] - manifest["stages"][0]["bits"] if lossy else None,
            "cumulative_bytes": cum, "share": size / orig, "cumulative_share": cum / orig,
            "max_abs_error": st.get("max_abs_error"), "max_rel_error": st.get("max_rel_error"),
            "present": present,
        })
    notes = list(manifest.get("notes", []))
    if missing:
        notes.append(f"missing from {package}: {', '.join(missing)} (listed by the manifest; "
                     "those stages cannot be applied from this folder)")
    return {
        "package": str(package), "package_id": manifest["package_id"],
        "name": manifest.get("name"), "version": manifest.get("version"),
        "format_version": manifest["format_version"], "source": src,
        "plan": manifest["plan"], "config": manifest.get("config", {}),
        "base_opset": manifest["base_model"].get("opset"),
        "tensors": len(manifest["tensors"]), "stages": rows,
        "allocation": manifest.get("allocation"), "notes": notes,
        **({"predecessor": manifest["predecessor"],
            "predecessor_text": _pred_text(manifest["predecessor"]),
            "update_kinds": {k: sum(t["update"] == k for t in manifest["tensors"])
                             for k in ("same", "delta", "new")}}
           if is_update(manifest) else {}),
        **({"tensor_table": [
            {"name": t["name"], "bits": t.get("bits", 0), "update": t.get("update"), "layout": t["layout"], "dtype": t["dtype"],
             "size": int(np.prod(t["shape"], dtype=np.int64)), "est_error": t.get("est_error")}
            for t in manifest["tensors"]]} if tensors else {}),
    }


def _present(package: Path, f: dict[str, Any]) -> bool:
    """Whether the file of manifest entry ``f`` is in ``package``: a regular file (not a link)
    of the listed size."""
    try:
        p = package_file(package, f["path"])
        return os.lstat(p).st_size == f["size"]
    except (OSError, P2UError):
        return False


def verify(package: str | os.PathLike, *, expect: str | None = None,
           trust: TrustSpec | None = None) -> dict[str, Any]:
    """Check every file against the manifest and replay every stage.

    Checks: the manifest (:func:`~p2u_onnx.format.validate_manifest`), base.onnx and base.bin
    (sizes, sha256, external data against the tensor table), that onnx and onnxruntime both
    load base.onnx, the probe file (size, sha256, its arrays), that stage 0 carries the same
    base files, and every stage file (sha256, header, binding to this manifest), replayed. For
    a plan that ends lossless, the restored weights must hash to the source digest. Raises
    :class:`IntegrityError` / :class:`FormatError` naming the first problem. ``expect``
    (``"sha256:<hex>"`` of the exact bytes of ``manifest.json``) pins the package and ``trust``
    (public keys: ``"ed25519:..."``, ``.pub`` files) asks for a valid signature by one of them
    (:class:`~p2u_onnx.errors.TrustError`); both are checked first. A local folder's version is
    neither checked against nor recorded in the device's version state (sessions and fetches
    do that). The result's ``manifest_sha256`` is what ``expect`` takes.
    """
    package = Path(package)
    manifest, raw = _checked_manifest(package, expect, trust)
    if is_update(manifest):  # its files only; replaying needs the predecessor
        from .updates import verify_update

        return verify_update(package, expect=expect, trust=trust)
    _check_base_digests(package, manifest)
    base_onnx = package / "base.onnx"
    with tempfile.TemporaryDirectory(prefix="p2u-verify-") as tmp:
        # onnx and onnxruntime load private copies of what p2u checked, never the package's
        # files: onnx's hard-link guard refuses a package a user copied with cp -al
        copy = _private_copies(package, manifest, Path(tmp))
        try:
            onnx.checker.check_model(str(copy))
        except Exception as e:
            raise _onnx_error(f"{base_onnx}: not a valid ONNX model", e) from e
        try:
            import onnxruntime as ort

            session = ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _onnx_error(f"{base_onnx}: onnxruntime cannot load it", e) from e
        if manifest.get("probe"):  # its size and sha256, and every array it must hold
            from .probe import Probe, read_probe_file

            Probe(manifest["probe"], read_probe_file(package, manifest["probe"]),
                  session.get_inputs())
        del session
    f0 = manifest["stages"][0]["files"][0]
    sf0 = read_stage(_check_file(package, f0), package_id=manifest["package_id"], stage=0,
                     sha256=f0["sha256"], manifest=manifest)
    for f in manifest["base_model"]["files"]:
        data = extract_file(sf0, f["path"], size=f["size"])
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise IntegrityError(f"{f['path']} inside {f0['path']} differs from the package's "
                                 f"{f['path']}")
        del data
    last = len(manifest["stages"]) - 1
    result = {"package": str(package), "stages": last + 1, "lossless_match": None,
              "signed": trust is not None, "name": manifest.get("name"),
              "version": manifest.get("version"),
              "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    if last >= 1:
        state = open_stages(package, last, manifest=manifest)
        model = _filled_model(state)
        if manifest["plan"][-1] == "lossless":
            try:
                digest = weights_digest(model)
            except P2UError:
                raise
            except Exception as e:  # onnx on a hostile skeleton
                raise _onnx_error(f"{package}: the restored model cannot be read", e) from e
            if digest != manifest["source"]["weights_sha256"]:
                raise IntegrityError(f"{package}: the lossless stage does not reproduce the "
                                     "source weights")
            result["lossless_match"] = True
        del state
        # the skeleton graph must load as the base did (a session would fail at stage 1)
        with tempfile.TemporaryDirectory(prefix="p2u-verify-") as tmp:
            try:
                import onnxruntime as ort

                path = Path(tmp) / "stage.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True,
                                all_tensors_to_one_file=True, location="stage.data")
                del model
                ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except OSError as e:
                raise P2UError(f"cannot write into {tmp}: {e.strerror or e}") from e
            except Exception as e:
                raise _onnx_error(f"{package}: stage {last} (graph.onnx of stage 1 with its "
                                  "weights): onnxruntime cannot load it", e) from e
    return result


def _private_copies(package: Path, manifest: dict[str, Any], folder: Path) -> Path:
    """``base.onnx`` and ``base.bin`` of a package (sizes and digests already checked) copied
    into ``folder``, so that nothing opens the package's own files; returns the copy of
    ``base.onnx``."""
    from .format import open_regular

    for f in manifest["base_model"]["files"]:
        if f["path"] not in ("base.onnx", "base.bin"):
            continue
        try:
            with open_regular(package / f["path"]) as src, open(folder / f["path"], "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except OSError as e:
            raise FormatError(f"cannot copy {package / f['path']} into {folder}: "
                              f"{e.strerror or e}") from e
    return folder / "base.onnx"


def stage_path(package: str | os.PathLike, index: int) -> Path:
    return Path(package) / stage_file_name(index)

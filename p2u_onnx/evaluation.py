"""Check a package against its original model on real inputs: ``p2u eval`` (encoder side).

:func:`evaluate` runs every stage of a package and the original model in onnxruntime (CPU,
default session options, as a user's own ``InferenceSession`` would) over the same feeds and
reports, per stage and per output:

* ``agreement``: top-1 agreement (argmax over the last axis) for float outputs that look like
  class scores (last dimension > 1), the share of positions whose argmax matches the original
  (an embedding gets one too, which means little: read its cosine);
* ``cosine``: cosine similarity of the flattened output per sample (per row of the leading axis
  when the output has two or more dimensions, else per feed), then the mean over samples;
* ``max_abs_error`` and ``rel_error`` (``||stage - original|| / ||original||`` over all values);
* ``exact_match``: for integer, bool and string outputs, the share of values equal to the
  original's;
* ``latency_ms``: median and 90th percentile of the per-run times, measured after the untimed
  pass that gives the metrics, interleaved (for each feed, every session runs once in turn, in
  a new random order each round, so background noise and cache state hit all alike), and
  ``latency_ratio``: the stage's median over the original's;
* ``cumulative_bytes`` to reach the stage (from the manifest) and ``share`` of the model's
  fp32-equivalent weight bytes.

The reference is ``original`` (an ONNX file) or, when omitted, the package's own last stage if
it is lossless (restored in memory); the result says which. Inputs: an ``.npz`` of the user's
(:func:`load_inputs`: one array per model input name), feeds given directly, synthesized ones
(``synth=True``, made as the encoder makes them), or by default the inputs of the package's
probe. Outputs that are not tensors (sequences, maps) are skipped and said so.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, P2UError
from .probe import read_output

__all__ = ["evaluate", "load_inputs"]

MIN_TIMED_RUNS = 20  # per session, when repeats is not given
INLINE_LIMIT = (2**31 - 1) - (64 << 20)  # larger restored stages reach onnxruntime as files

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------- inputs

# what to pass instead, as the API and as the command line word it
_INPUTS_HINT = ("inputs= (an .npz path, or feeds) or synth=True",
                "--inputs FILE.npz (one array per model input) or --synth")


def _with_hint(cls: type[P2UError], text: str, hint: tuple[str, str]) -> P2UError:
    return cls(f"{text}; pass {hint[0]}", cli=f"{text}; pass {hint[1]}")



def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _dims(arg: Any) -> list[int | None]:
    return [d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or [])]


def load_inputs(path: str | os.PathLike, args: Sequence[Any], *,
                batch: int | None = None) -> tuple[list[Feed], list[str]]:
    """Feeds from an ``.npz`` holding one array per model input (``args``: onnxruntime's
    input descriptions), and notes on what was done.

    An array of exactly the input's rank is one feed, unless the input's first dimension is
    fixed at ``B`` and the array holds a multiple of ``B`` rows (then one feed per ``B`` rows);
    an array with one more leading axis than the input holds one feed per index of that axis.
    ``batch`` splits every array of the common leading length into feeds of ``batch`` rows.
    Arrays for names the model does not take are ignored (a note says which). Raises
    :class:`P2UError`, one line naming the file and the array, for anything else: not an
    ``.npz``, pickled object arrays, a missing input, another dtype or shape.
    """
    from .probe import _NUMPY_TYPES

    from .calibrate import check_npz_file

    p = check_npz_file(path)
    data: dict[str, np.ndarray] = {}
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a damaged zip
        raise P2UError(f"{p}: cannot read the inputs ({_first_line(e)})") from None
    with z:
        names = [a.name for a in args]
        missing = [n for n in names if n not in z.files]
        if missing:
            raise P2UError(f"{p}: no array for input {', '.join(map(repr, missing))} (it "
                           f"holds {', '.join(map(repr, z.files)) or 'nothing'}); save one "
                           "array per model input: numpy.savez(path, input_name=array, ...)")
        for n in names:
            try:
                data[n] = z[n]
            except ValueError as e:
                why = "holds Python objects (pickled), which are not loaded" \
                    if "pickle" in str(e) else _first_line(e)
                raise P2UError(f"{p}: array {n!r} {why}") from None
            except Exception as e:  # noqa: BLE001 - a damaged member
                raise P2UError(f"{p}: array {n!r} cannot be read ({_first_line(e)})") from None
        ignored = [k for k in z.files if k not in data]
    notes = [f"ignored arrays in {p.name} that are not model inputs: {', '.join(ignored)}"] \
        if ignored else []

    for a in args:
        want = _NUMPY_TYPES.get(a.type)
        if want is not None and data[a.name].dtype != np.dtype(want):
            raise P2UError(f"{p}: array {a.name!r} is {data[a.name].dtype}; the model's input "
                           f"takes {np.dtype(want)}")

    def fits(arr: np.ndarray, dims: list[int | None]) -> bool:
        return arr.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims, arr.shape))

    def expected(dims: list[int | None]) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"

    if batch is not None:
        if batch < 1:
            raise P2UError(f"batch must be at least 1, not {batch}")
        lead = [data[a.name].shape[0] for a in args if data[a.name].ndim]
        if not lead:
            raise P2UError(f"{p}: the arrays have no leading axis to split into batches")
        n = lead[0]
        feeds = [{k: v[i:i + batch] if v.ndim and v.shape[0] == n else v
                  for k, v in data.items()} for i in range(0, n, batch)]
    else:
        splits: dict[str, tuple[int, int]] = {}  # name -> (feeds, rows per feed; 0: drop axis)
        for a in args:
            arr, dims = data[a.name], _dims(a)
            if a.shape is None or fits(arr, dims):
                continue
            if arr.ndim == len(dims) + 1 and arr.shape[0] and fits(arr[0], dims):
                splits[a.name] = (arr.shape[0], 0)
            elif arr.ndim == len(dims) and dims and dims[0] and arr.shape[0] % dims[0] == 0 \
                    and fits(arr[:dims[0]], dims):
                splits[a.name] = (arr.shape[0] // dims[0], dims[0])
            else:
                raise P2UError(f"{p}: array {a.name!r} has shape {list(arr.shape)}; the model's "
                               f"input takes {expected(dims)} (? = any size), or one more "
                               "leading axis of feeds")
        counts = {k: s[0] for k, s in splits.items()}
        if len(set(counts.values())) > 1:
            raise P2UError(f"{p}: the arrays hold different numbers of feeds "
                           f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
        n = next(iter(counts.values()), 1)

        def part(k: str, i: int) -> np.ndarray:
            if k not in splits:
                return data[k]
            rows = splits[k][1]
            return data[k][i] if rows == 0 else data[k][i * rows:(i + 1) * rows]

        feeds = [{k: part(k, i) for k in data} for i in range(n)]
    if not feeds:
        raise P2UError(f"{p}: the arrays hold no rows")
    for i, feed in enumerate(feeds):
        _check(feed, args, f"{p}" + (f" (feed {i})" if len(feeds) > 1 else ""))
    return feeds, notes


def _check(feed: Mapping[str, np.ndarray], args: Sequence[Any], where: str) -> None:
    from .probe import check_feed

    try:
        check_feed([a for a in args if a.shape is not None],
                   {a.name: feed[a.name] for a in args if a.shape is not None and a.name in feed})
    except P2UError as e:
        raise P2UError(f"{where}: {e}") from None
    missing = [a.name for a in args if a.name not in feed]
    if missing:
        raise P2UError(f"{where}: no value for input {', '.join(map(repr, missing))}")


def _probe_feed(package: Path, manifest: Mapping[str, Any], args: Sequence[Any]) -> Feed | None:
    from .probe import Probe

    entry = manifest.get("probe")
    if not isinstance(entry, Mapping):
        return None
    name = entry.get("path")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise FormatError(f"{package}: the manifest's probe path {str(name)[:80]!r} is not a "
                          "file name inside the package")
    f = package / name
    try:  # as every reader does: a plain regular file (no link, no FIFO), size-capped
        from .probe import read_probe_file

        data = read_probe_file(package, entry)
    except P2UError as e:
        raise _with_hint(type(e), str(e), _INPUTS_HINT) from None
    try:
        return dict(Probe(entry, data, args).feed)
    except P2UError as e:
        raise _with_hint(type(e), str(e), _INPUTS_HINT) from None
    except Exception as e:  # noqa: BLE001 - a malformed entry or file: KeyError, ValueError...
        raise _with_hint(FormatError, f"{f}: not a probe this package's manifest describes "
                         f"({type(e).__name__}: {_first_line(e)})", _INPUTS_HINT) from None


# ---------------------------------------------------------------- metrics


class _OutputStats:
    """Running comparison of one output of one stage with the reference's."""

    def __init__(self) -> None:
        self.kind: str | None = None  # "float" | "int"
        self.feeds = self.shape_mismatch = self.nonfinite_mismatch = 0
        self.cos_sum = 0.0
        self.cos_n = 0
        self.agree = self.agree_n = 0
        self.max_abs = 0.0
        self.err_sq = self.ref_sq = 0.0
        self.equal = self.equal_n = 0
        self.top1 = False

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        if ref.shape != got.shape or ref.dtype.kind != got.dtype.kind:
            self.shape_mismatch += 1
            return
        self.feeds += 1
        if ref.size == 0:
            return
        if ref.dtype.kind == "f":
            self.kind = "float"
            r, g = ref.astype(np.float64), got.astype(np.float64)
            fin = np.isfinite(r) & np.isfinite(g)
            bad = ~fin & ~((r == g) | (np.isnan(r) & np.isnan(g)))
            self.nonfinite_mismatch += int(np.count_nonzero(bad))
            r, g = np.where(fin, r, 0.0), np.where(fin, g, 0.0)
            d = g - r
            if d.size:
                self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
            self.err_sq += float(np.sum(d * d))
            self.ref_sq += float(np.sum(r * r))
            rows_r = r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1)
            rows_g = g.reshape(rows_r.shape)
            dot = np.sum(rows_r * rows_g, axis=1)
            nr = np.sqrt(np.sum(rows_r * rows_r, axis=1))
            ng = np.sqrt(np.sum(rows_g * rows_g, axis=1))
            same = np.all(rows_r == rows_g, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(same, 1.0, np.where((nr > 0) & (ng > 0), dot / (nr * ng), 0.0))
            self.cos_sum += float(np.sum(np.clip(cos, -1.0, 1.0)))
            self.cos_n += cos.size
            if ref.ndim >= 1 and ref.shape[-1] > 1:
                self.top1 = True
                a = np.argmax(ref, axis=-1)
                b = np.argmax(got, axis=-1)
                self.agree += int(np.count_nonzero(a == b))
                self.agree_n += a.size
        else:
            self.kind = "int"
            self.equal += int(np.count_nonzero(ref == got))
            self.equal_n += ref.size

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "feeds": self.feeds}
        if self.shape_mismatch:
            out["shape_mismatch"] = self.shape_mismatch
        if self.kind == "float":
            out["agreement"] = self.agree / self.agree_n if self.top1 and self.agree_n else None
            out["cosine"] = self.cos_sum / self.cos_n if self.cos_n else None
            out["max_abs_error"] = self.max_abs
            out["rel_error"] = math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else \
                (0.0 if self.err_sq == 0 else None)
            if self.nonfinite_mismatch:
                out["nonfinite_mismatch"] = self.nonfinite_mismatch
        elif self.kind == "int":
            out["exact_match"] = self.equal / self.equal_n if self.equal_n else None
        return out


def _worst(rows: list[dict[str, Any]], key: str, fn: Any) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return fn(vals) if vals else None


def _percentile_ms(times: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(times), q)) * 1e3 if times else None


# ---------------------------------------------------------------- evaluate


def _session(model: str | bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing run is reported in one line (P2UError), not logged
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _fp32_bytes(src: Mapping[str, Any]) -> tuple[int | None, str]:
    """The denominator of shares: the fp32-equivalent weight bytes, or the closest the
    manifest has."""
    if src.get("fp32_equivalent_bytes"):
        return int(src["fp32_equivalent_bytes"]), "fp32-equivalent weight bytes"
    wb, cw, cf = src.get("weight_bytes"), src.get("coded_weight_bytes"), src.get("coded_fp32_bytes")
    if wb and cw is not None and cf is not None:
        return int(wb - cw + cf), "fp32-equivalent weight bytes" if cw == cf else \
            "weight bytes, coded tensors counted at fp32"
    if wb:
        return int(wb), "weight bytes"
    return None, "unknown"


def evaluate(package: str | os.PathLike, original: str | os.PathLike | None = None,
             inputs: str | os.PathLike | Mapping[str, np.ndarray]
             | Sequence[Mapping[str, np.ndarray]] | None = None, *,
             stages: Sequence[int] | None = None, repeats: int | None = None,
             synth: bool = False, batch: int | None = None) -> dict[str, Any]:
    """Compare each stage of ``package`` with the original model on the same inputs.

    ``original``: the original ONNX file [default: the package's last stage, when lossless].
    ``inputs``: an ``.npz`` path (see :func:`load_inputs`; ``batch`` rows per feed), one feed
    (a mapping of input names to arrays) or a list of feeds; ``synth=True`` synthesizes them
    as the encoder does; with neither, the package's probe inputs are used. ``stages``: the
    stage indices to run [default: all]. ``repeats``: timed runs per feed and session, after
    an untimed pass over the feeds that gives the metrics [default: enough for
    :data:`MIN_TIMED_RUNS` per session, at least one per feed]. Returns a dict (see the module
    docstring), every value JSON-serializable; ``notes`` says which reference and inputs were
    used.

    >>> evaluate("model.p2u", inputs="data.npz")["stages"][0]["agreement"]  # doctest: +SKIP
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="p2u-eval-") as tmp:
        return _evaluate(Path(package), original, inputs, stages, repeats, synth, batch,
                         Path(tmp))


def _model_input(model: Any, tmp: Path, stage: int) -> str | bytes:
    """What onnxruntime loads ``model`` from: its bytes, or past the protobuf limit a file in
    ``tmp`` with its tensors beside it."""
    from .api import _all_tensors

    if sum(len(t.raw_data) for t in _all_tensors(model)) < INLINE_LIMIT:
        return model.SerializeToString()
    import onnx

    path = tmp / f"stage-{stage}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"stage-{stage}.data")
    return str(path)


def _evaluate(pkg: Path, original: str | os.PathLike | None, inputs: Any,
              stages: Sequence[int] | None, repeats: int | None, synth: bool,
              batch: int | None, tmp: Path) -> dict[str, Any]:
    import onnx

    from .api import load_stage_model
    from .format import check_file_entry, load_manifest

    if inputs is not None and synth:
        raise P2UError("give inputs or synth, not both")
    if repeats is not None and repeats < 1:
        raise P2UError(f"repeats must be at least 1, not {repeats}")
    manifest = load_manifest(pkg)
    n_stages = len(manifest["stages"])
    chosen = list(range(n_stages)) if stages is None else sorted({int(k) for k in stages})
    bad = [k for k in chosen if not 0 <= k < n_stages]
    if bad:
        raise P2UError(f"stage {bad[0]} does not exist: this package has stages "
                       f"0..{n_stages - 1}")
    notes: list[str] = []
    last = n_stages - 1
    lossless = manifest["plan"][-1] == "lossless"

    # the reference
    ref_proto: onnx.ModelProto | None = None
    if original is not None:
        orig = Path(original)
        try:
            ref_proto = onnx.load(str(orig))
        except OSError as e:
            raise P2UError(f"{orig}: cannot read the model ({e.strerror or e})") from None
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise P2UError(f"{orig}: not an ONNX model ({_first_line(e)})") from None
        try:
            ref_sess = _session(str(orig))
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors
            raise P2UError(f"{orig}: onnxruntime cannot load it ({_first_line(e)})") from None
        reference = {"kind": "model", "path": str(orig)}
        same = _same_weights(ref_proto, manifest)
        reference["same_weights_as_source"] = same
        notes.append(f"reference: {orig}" + (
            "" if same is None else " (the package's source weights)" if same else
            " (its weights differ from the package's source: another model?)"))
    else:
        if not lossless:
            raise _with_hint(P2UError, f"{pkg}: the last stage is not lossless, so the package "
                             "holds no copy of the original",
                             ("original='ORIGINAL.onnx'", "--model ORIGINAL.onnx"))
        ref_proto = load_stage_model(pkg, last)
        ref_bytes = _model_input(ref_proto, tmp, last)
        try:
            ref_sess = _session(ref_bytes)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors
            raise P2UError(f"stage {last}: onnxruntime cannot load it ({_first_line(e)})") \
                from None
        reference = {"kind": "lossless-stage", "stage": last}
        notes.append(f"reference: the package's lossless stage {last} (restored in memory)")

    # the stages
    sessions: dict[int, Any] = {}
    for k in chosen:
        try:
            if k == 0:
                for f in manifest["base_model"]["files"]:
                    check_file_entry(pkg / Path(f["path"]).name, f)
                sessions[k] = _session(str(pkg / "base.onnx"))
            elif k == last and original is None:
                sessions[k] = _session(ref_bytes)
            else:
                sessions[k] = _session(_model_input(load_stage_model(pkg, k), tmp, k))
        except P2UError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors
            raise P2UError(f"stage {k}: onnxruntime cannot load it ({_first_line(e)})") from None

    # the inputs
    args = ref_sess.get_inputs()
    for k, sess in sessions.items():
        theirs = {a.name for a in sess.get_inputs()}
        if not theirs <= {a.name for a in args}:
            mine = ", ".join(a.name for a in args)
            raise P2UError(f"{original or 'the reference'}: its inputs ({mine}) are not those "
                           f"of the package's stage {k} ({', '.join(sorted(theirs))}): "
                           "another model?")
    if isinstance(inputs, (str, os.PathLike)):
        feeds, more = load_inputs(inputs, args, batch=batch)
        notes += more
        source = {"kind": "npz", "path": str(inputs)}
    elif isinstance(inputs, Mapping):
        feeds, source = [dict(inputs)], {"kind": "given"}
    elif inputs is not None:
        feeds, source = [dict(f) for f in inputs], {"kind": "given"}
    elif synth:
        feeds, how = _synth_feeds(ref_proto, ref_sess)
        source = {"kind": "synth"}
        if how:
            notes.append(f"synthesized inputs: {how} (the sizes the graph implied did not run)")
    else:
        probe = _probe_feed(pkg, manifest, (sessions[0] if 0 in sessions else ref_sess)
                            .get_inputs())
        if probe is None:
            raise _with_hint(P2UError, f"{pkg}: the package has no probe inputs",
                             _INPUTS_HINT)
        feeds, source = [probe], {"kind": "probe"}
    ref_proto = ref_bytes = None  # the sessions hold what they need
    if not feeds:
        raise P2UError("no inputs to run")
    if source["kind"] != "npz":
        for i, feed in enumerate(feeds):
            _check(feed, args, f"{source['kind']} inputs" + (f" (feed {i})" if len(feeds) > 1
                                                              else ""))
    source["feeds"] = len(feeds)
    if repeats is None:
        repeats = max(1, -(-MIN_TIMED_RUNS // len(feeds)))
    notes.append(f"inputs: {source['kind']}" + (f" {source['path']}" if "path" in source else "")
                 + f" ({len(feeds)} feed{'s' if len(feeds) != 1 else ''})")

    # run: every feed through every session once for the metrics, then the timed rounds
    out_names = [o.name for o in ref_sess.get_outputs()]
    order: list[tuple[int | None, Any]] = [(None, ref_sess)] + [(k, sessions[k]) for k in chosen]
    feed_of = {id(s): [a.name for a in s.get_inputs()] for _, s in order}
    times: dict[int | None, list[float]] = {k: [] for k, _ in order}
    stats = {k: {n: _OutputStats() for n in out_names} for k in chosen}
    skipped: set[str] = set()

    def run(k: int | None, sess: Any, feed: Feed, i: int) -> list[Any]:
        try:
            return sess.run(out_names, {n: feed[n] for n in feed_of[id(sess)]})
        except KeyError as e:
            raise P2UError(f"{'the original' if k is None else f'stage {k}'} takes input "
                           f"{e.args[0]!r}, which the inputs lack") from None
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors
            who = "the original" if k is None else f"stage {k}"
            made = "" if source["kind"] in ("npz", "given") else \
                " (" + ", ".join(f"{n} {'x'.join(map(str, np.shape(v)))}" for n, v in
                                 feed.items()) + f", {source['kind']} inputs: pass --inputs " \
                "with inputs the model runs on)"
            raise P2UError(f"{who} fails on feed {i}{made}: {_first_line(e)}") from None

    shuffle = np.random.default_rng(0)  # each round's order: no session always follows another
    for i, feed in enumerate(feeds):
        ref_out = run(None, ref_sess, feed, i)
        for k in chosen:
            got = run(k, sessions[k], feed, i)
            for n, r, g in zip(out_names, ref_out, got):
                r, g = read_output(r), read_output(g)  # class-probability maps
                if isinstance(r, np.ndarray) and isinstance(g, np.ndarray):
                    stats[k][n].add(r, g)
                else:
                    skipped.add(n)
        del ref_out
    # timed apart from the metrics (whose numpy work would leave the sessions that ran last
    # warmest), each round in a new order
    for feed in feeds:
        for _ in range(repeats):
            for j in shuffle.permutation(len(order)):
                k, sess = order[j]
                ins = {n: feed[n] for n in feed_of[id(sess)]}
                t = time.perf_counter()
                sess.run(out_names, ins)
                times[k].append(time.perf_counter() - t)
    if skipped:
        notes.append(f"outputs not compared (not tensors): {', '.join(sorted(skipped))}")

    denom, share_of = _fp32_bytes(manifest["source"])
    ref_median = _percentile_ms(times[None], 50)
    sizes = [(int(np.prod(t["shape"], dtype=np.int64)), t["bits"]) for t in manifest["tensors"]]
    n_coded = sum(n for n, _ in sizes)
    mean0 = sum(n * b for n, b in sizes) / n_coded if n_coded else None
    bits0 = manifest["stages"][0]["bits"]
    rows = []
    for k in chosen:
        st = manifest["stages"][k]
        per = {n: s.result() for n, s in stats[k].items() if n not in skipped}
        vals = list(per.values())
        med = _percentile_ms(times[k], 50)
        lossy = isinstance(st["bits"], int) and isinstance(bits0, int) and mean0 is not None
        rows.append({
            "stage": k, "bits": st["bits"],
            "mean_bits": mean0 + st["bits"] - bits0 if lossy else None,
            "cumulative_bytes": st["cumulative_bytes"],
            "share": st["cumulative_bytes"] / denom if denom else None,
            "agreement": _worst(vals, "agreement", min),
            "cosine": _worst(vals, "cosine", min),
            "max_abs_error": _worst(vals, "max_abs_error", max),
            "rel_error": _worst(vals, "rel_error", max),
            "exact_match": _worst(vals, "exact_match", min),
            "latency_ms": {"median": med, "p90": _percentile_ms(times[k], 90)},
            "latency_ratio": med / ref_median if med is not None and ref_median else None,
            "outputs": per,
        })
        nonfinite = sum(v.get("nonfinite_mismatch", 0) for v in vals)
        if nonfinite:
            notes.append(f"stage {k}: {nonfinite} value(s) are NaN or infinite in one output "
                         "and not in the other (left out of cosine and errors)")
        mism = sum(v.get("shape_mismatch", 0) for v in vals)
        if mism:
            notes.append(f"stage {k}: {mism} output(s) of another shape or type than the "
                         "original's were not compared")
    if len(out_names) - len(skipped) > 1:
        notes.append(f"per stage: the worst over {len(out_names) - len(skipped)} outputs "
                     "(each output's figures are in the JSON)")
    return {
        "package": str(pkg), "reference": reference, "inputs": source,
        "outputs": [n for n in out_names if n not in skipped],
        "repeats": repeats, "share_of": share_of, "fp32_bytes": denom,
        "reference_latency_ms": {"median": ref_median, "p90": _percentile_ms(times[None], 90)},
        "stages": rows, "notes": notes,
    }


def _same_weights(model: Any, manifest: Mapping[str, Any]) -> bool | None:
    """Whether ``model``'s constant tensors hash to the package's source digest (None: the
    manifest lacks what it takes to tell)."""
    from onnx import ModelProto

    from . import passes
    from .encoder import weights_digest

    want = manifest.get("source", {}).get("weights_sha256")
    min_elements = manifest.get("config", {}).get("min_elements")
    if not isinstance(want, str) or not isinstance(min_elements, int):
        return None
    m = ModelProto()
    m.CopyFrom(model)
    try:
        passes.normalize(m, min_elements)
        return weights_digest(m) == want
    except Exception:  # noqa: BLE001 - a model the encoder could not read either
        return False


def _synth_feeds(model: Any, session: Any) -> tuple[list[Feed], str]:
    """Synthesized feeds (as the encoder makes them) the original runs on, and which retry
    made them ('' for the sizes the graph implies): other image sizes, sequence lengths and
    one sample at a time are tried as calibration tries them. When none runs, the first ones
    (the run that fails says why)."""
    from .calibrate import fallback_sizes, synthesize_feeds

    first = synthesize_feeds(model)
    for r in [{}, *fallback_sizes(model)]:
        feeds = first if not r else synthesize_feeds(model, **r)
        try:
            session.run(None, feeds[0])
        except Exception:  # noqa: BLE001 - not these sizes
            continue
        return feeds, ", ".join(f"{k} {v}" for k, v in r.items())
    return first, ""

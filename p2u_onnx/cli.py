"""The ``p2u`` command: a thin layer over the library. Errors print one line, exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._cliutil import CONTEXT, ProgressBar, _fmt_bytes, _friendly, cleanup_on_sigterm
from .cli_http import fetch as _fetch_command
from .cli_http import serve as _serve_command
from .errors import P2UError


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="p2u-onnx")
def main() -> None:
    """p2u: ship ONNX models progressively.

    Encode a model into a low-bit base that runs at once plus updates that raise precision
    stage by stage, up to the exact original weights.
    """


def _trust_options(rollback: bool):
    """--expect and --trust (and with ``rollback``, --allow-rollback) on a command."""

    def decorate(fn):
        if rollback:
            fn = click.option(
                "--allow-rollback", is_flag=True,
                help="Accept a package older than the version of its model this device "
                     "accepted before (or the same version with other content), and remember "
                     "it as the current one.")(fn)
        fn = click.option(
            "--trust", "trust", multiple=True, metavar="PUBKEY",
            help="Refuse the package unless manifest.json.sig is a valid, unexpired signature "
                 "by this key: 'ed25519:...' or a .pub file from p2u keygen (repeat for "
                 "several keys; needs p2u-onnx[sign]).")(fn)
        return click.option(
            "--expect", metavar="sha256:HEX",
            help="Refuse the package unless manifest.json's sha256 is HEX (the manifest lists "
                 "every file's sha256, so this pins the whole package).")(fn)

    return decorate


def _from_options(help_text: str):
    """--from (repeatable) and --from-stage on a command."""

    def decorate(fn):
        fn = click.option("--from-stage", "from_stage", type=int, default=None,
                          help="Stage of the --from package the device holds [default: the "
                               "one the update names, else its last].")(fn)
        return click.option("--from", "base_from", multiple=True,
                            type=click.Path(path_type=Path), help=help_text)(fn)

    return decorate


def _quiet_onnxruntime(severity: int = 4) -> None:
    """Keep onnxruntime's own log lines off stderr for the sessions of this process: its errors
    reach the user as p2u's one-line message, its warnings are about graphs p2u made."""
    import onnxruntime as ort

    ort.set_default_logger_severity(severity)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Package directory to write [default: MODEL with suffix .p2u].")
@click.option("--stages", default=None,
              help="Bits per stage, rising; 'lossless' may end the plan (e.g. 4,8 or "
                   "2,4,8,lossless) [default: 4,8,lossless; with --from: auto,lossless, the "
                   "bits of the changed tensors' deltas, 1 or 2 per tensor].")
@click.option("--granularity", type=click.Choice(["block", "channel", "tensor"]), default="block",
              show_default=True, help="Scale per block of weights, per output channel or per tensor.")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="Weights per block (inside one output channel) with --granularity block.")
@click.option("--asymmetric", is_flag=True, help="Use a zero point per block (default: symmetric).")
@click.option("--min-elements", type=int, default=1024, show_default=True,
              help="Smaller float tensors stay exact in the base.")
@click.option("--budget", type=float, default=None,
              help="Size of the base: a share of the fp32-equivalent weight bytes (every float "
                   "weight counted at 4 bytes, so fp16, bf16 and fp64 models get the bits per "
                   "weight of their fp32 twin; e.g. 0.15) or bits per coded weight (e.g. 4.5), "
                   "spent where it lowers the output error most [default: 0.135, raised up to "
                   "--cap while an output's estimated quality is below its target (0.985 "
                   "top-1/decision agreement, 0.995 cosine) or below the plain base's].")
@click.option("--quality", type=float, default=None,
              help="Smallest base whose every output reaches this estimated quality, as its "
                   "task reads it (top-1 agreement of class scores, decision agreement of "
                   "probabilities, share of scores within 0.2 of their spread, cosine of the "
                   "rest; e.g. 0.99); exits non-zero when it cannot within --cap (see "
                   "--allow-below).")
@click.option("--cap", type=float, default=0.20, show_default=True,
              help="Largest base, as a share of the fp32-equivalent weight bytes. Never below "
                   "the plain base: when the plain base is larger, it is used and a warning "
                   "says why.")
@click.option("--allow-below", is_flag=True,
              help="Accept a base whose estimated quality stays below --quality (a warning).")
@click.option("--inputs", "--calib", "calib", type=click.Path(exists=True, dir_okay=False),
              default=None,
              help="Real inputs (.npz, one array per model input) that calibration measures "
                   "sensitivity on and the probe records [default: inputs synthesized from "
                   "the model's signature and what its graph implies].")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Size of an input whose shape the graph leaves open (repeat per input), "
                   "e.g. --shape images=1,3,320,320; used by calibration and the probe.")
@click.option("--fixed-bits", is_flag=True,
              help="Every tensor gets the plan's base bits (no sensitivity analysis).")
@click.option("--no-probe", is_flag=True,
              help="Skip recording the probe the runtime uses to check each upgrade.")
@click.option("--name", default=None,
              help="Model name in the manifest: devices refuse a lower --version of a name they "
                   "have seen [default: MODEL's file name without .onnx].")
@click.option("--version", "version", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Release number of this package, higher than the last one published under "
                   "the same --name [default: $SOURCE_DATE_EPOCH, else the encode time in "
                   "seconds].")
@click.option("-f", "--force", is_flag=True,
              help="Replace OUTPUT if it is a p2u package (in one atomic step where the system "
                   "allows).")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar or table, and no log lines from onnxruntime.")
@_from_options("Write an update against what a device holds: the previous model (.onnx) or "
               "package (at its last stage, or --from-stage); repeat to name a chain "
               "(--from v1.p2u --from v2-from-v1.p2u).")
@click.option("--ship-graph/--reuse-graph", default=None,
              help="With --from: ship the new skeleton graph whole (the update then applies to "
                   "the model whatever way a device reached it), or code it against the one "
                   "the predecessor's devices hold (smaller; bound to that skeleton). "
                   "[default: reuse for --from-stage K of a package, ship for an exact model]")
@_friendly
def encode(model, output, stages, granularity, block_size, asymmetric, min_elements, budget,
           quality, cap, allow_below, calib, shapes, fixed_bits, no_probe, name, version, force,
           quiet, base_from, from_stage, ship_graph=None) -> None:
    """Encode MODEL (.onnx) into a progressive package directory.

    By default each tensor's base bits are chosen by their measured effect on the outputs
    (inputs synthesized from the model's signature, or --calib), within --budget. With
    --from, an update package: unchanged tensors cost nothing, changed ones are coded as
    deltas against what the device holds, the last stage restores every bit.
    """
    from .api import inspect
    from .config import BitBudget, Plan, QuantConfig
    from .encoder import encode as do_encode

    if base_from:
        from .updates import UPDATE_PLAN, encode_update

        output = output or model.with_suffix(".p2u")
        result = encode_update(model, output, list(base_from), from_stage=from_stage,
                               plan=stages or UPDATE_PLAN, overwrite=force, name=name,
                               version=version, ship_graph=ship_graph)
        if not quiet:
            click.echo(f"wrote {result.path} in {result.seconds:.2f} s")
            _print_table(inspect(result.path))
        return
    if from_stage is not None:
        raise P2UError("--from-stage needs --from")
    stages = stages or "4,8,lossless"

    plan = Plan.parse(stages)
    config = QuantConfig(granularity=granularity, block_size=block_size,
                         symmetric=not asymmetric, min_elements=min_elements)
    kw: dict = {"adaptive": not fixed_bits, "calib": calib, "cap": cap,
                "shapes": _parse_shapes(shapes)}
    if budget is not None or quality is not None:
        kw["budget"] = budget
    if quality is not None:
        kw["quality"] = quality
        kw["strict"] = not allow_below
    bits = BitBudget(**kw)
    output = output or model.with_suffix(".p2u")
    if quiet:
        _quiet_onnxruntime()
    with ProgressBar("encode", quiet) as progress, cleanup_on_sigterm():
        result = do_encode(model, output, plan, config, bits, overwrite=force,
                           probe=not no_probe, progress=progress, name=name, version=version)
    if not quiet:
        click.echo(f"wrote {result.path} in {result.seconds:.2f} s")
        _print_table(inspect(result.path))
    for note in result.warnings:  # even with -q: a missed target is never silent
        click.echo(f"warning: {note}", err=True)


def _parse_shapes(items: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``NAME=1,3,320,320`` options as (name, shape) pairs; a bad one is a one-line error."""
    out = []
    for item in items:
        name, sep, dims = item.partition("=")
        parts = dims.split(",") if "," in dims else dims.split("x")
        shape = tuple(int(d) for d in parts) if all(d.strip().isdigit() for d in parts) else ()
        if not sep or not name or not shape:
            raise click.BadParameter(f"{item!r}: expected NAME=D1,D2,... (e.g. "
                                     "images=1,3,320,320)", param_hint="--shape")
        out.append((name, shape))
    return tuple(out)


def _print_table(info: dict) -> None:
    src = info["source"]
    fp32 = src.get("fp32_equivalent_bytes")
    equiv = f" ({_fmt_bytes(fp32)} as fp32, what shares are of)" \
        if fp32 and fp32 != src["weight_bytes"] else ""
    click.echo(f"source {src['name']}: {_fmt_bytes(src['weight_bytes'])} of weights{equiv}, "
               f"{info['tensors']} coded tensors, plan {','.join(info['plan'])}")
    if info.get("predecessor"):
        kinds = info.get("update_kinds", {})
        click.echo(f"update of {info['predecessor_text']}: " +
                   ", ".join(f"{n} {k}" for k, n in kinds.items()) +
                   " tensor(s); errors are against the new model")
    click.echo(f"{'stage':>5} {'bits':>9} {'bytes':>10} {'share':>7} {'total':>10} {'share':>7}"
               f" {'max err':>10} {'rel err':>9}")
    for r in info["stages"]:
        mix = r.get("mean_bits")  # the mix of bits per coded weight, not the plan's number
        bits = f"{mix:.2f}" if isinstance(mix, (int, float)) else str(r["bits"])
        click.echo(f"{r['stage']:>5} {bits:>9} {_fmt_bytes(r['bytes']):>10} "
                   f"{r['share']:>7.1%} {_fmt_bytes(r['cumulative_bytes']):>10} "
                   f"{r['cumulative_share']:>7.1%} {r['max_abs_error']:>10.3g} "
                   f"{r['max_rel_error']:>9.2e}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-t", "--tensors", is_flag=True,
              help="Also list every coded tensor: base bits, layout, estimated error share.")
@_friendly
def inspect(package, as_json, tensors) -> None:
    """Show a package's stages: bytes, share of the original weights, max error."""
    from .api import inspect as do_inspect

    info = do_inspect(package, tensors=tensors or as_json)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    _print_table(info)
    alloc = info.get("allocation")
    if alloc:
        click.echo(f"base bits chosen {'with' if alloc['calibrated'] else 'without'} "
                   f"calibration; estimated base quality {alloc['est_quality']:.4f} "
                   f"(target {alloc.get('target_quality', 0.985):.4f})")
        outputs = alloc.get("outputs")
        for o in outputs if isinstance(outputs, list) else []:  # as each task reads it
            if isinstance(o, dict) and all(isinstance(o.get(k), (int, float)) for k in (
                    "est", "measured", "target")):
                click.echo(f"  {str(o.get('output'))[:200]}: {str(o.get('metric'))[:80]} "
                           f"{o['est']:.4f} estimated, {o['measured']:.4f} measured on the "
                           f"calibration inputs (target {o['target']:.4f})")
    for note in info.get("notes", []):
        click.echo(f"warning: {note}")
    if tensors:
        total = sum(t["est_error"] or 0 for t in info["tensor_table"]) or 1.0
        click.echo(f"{'bits':>4} {'layout':>14} {'weights':>10} {'est. error':>10}  tensor")
        for t in info["tensor_table"]:
            lay = t["layout"]
            desc = lay["mode"] if lay["mode"] == "tensor" else \
                f"{lay['mode']}@{lay['axis']}" + (f"/{lay['block_size']}" if lay["mode"] == "block" else "")
            share = "" if t["est_error"] is None else f"{(t['est_error'] or 0) / total:.1%}"
            click.echo(f"{t['bits']:>4} {desc:>14} {t['size']:>10} {share:>10}  {t['name']}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-s", "--stage", type=int, default=None,
              help="Stage to restore, counting from 0 (the base) [default: the last].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write.")
@_trust_options(rollback=False)
@_from_options("For an update package: what the device holds before it (a model or package, "
               "then any updates it took, in order).")
@_friendly
def restore(package, stage, output, expect, trust, base_from, from_stage) -> None:
    """Write the ONNX model of one stage of PACKAGE.

    With --expect / --trust the package is checked before anything is written. Versions are
    not checked against, nor recorded in, this device's version state (p2u run and p2u fetch do
    that).
    """
    from .api import restore as do_restore

    if base_from:
        from .updates import restore_update

        path = restore_update(package, output, list(base_from), stage, from_stage=from_stage,
                              expect=expect, trust=trust or None)
        click.echo(f"wrote {path}")
        return
    path = do_restore(package, output, stage, expect=expect, trust=trust or None)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@_trust_options(rollback=False)
@_from_options("For an update package: what the device holds before it; every stage is then "
               "replayed from it [default: files and headers checked only].")
@_friendly
def verify(package, expect, trust, base_from, from_stage) -> None:
    """Check every file of PACKAGE and replay every stage (bit-exact check when lossless).

    --expect pins the manifest's sha256 (printed on success, to pin it elsewhere); --trust asks
    for a valid signature. Versions are not checked against, nor recorded in, this device's
    version state (p2u run and p2u fetch do that).
    """
    from .api import verify as do_verify

    _quiet_onnxruntime()  # its errors reach the user as one line; no log lines of its own
    if base_from or from_stage is not None:
        from .updates import verify_update

        r = verify_update(package, list(base_from) or None, from_stage=from_stage,
                          expect=expect, trust=trust or None)
    else:
        r = do_verify(package, expect=expect, trust=trust or None)
    if r.get("predecessor") is not None and not r.get("replayed"):
        click.echo(f"ok: {r['stages']} stage files of the update match its manifest (not "
                   "replayed: give --from to replay them from the predecessor)")
        click.echo(f"manifest sha256:{r['manifest_sha256']}")
        return
    tail = ", lossless stage reproduces the source weights" if r["lossless_match"] else ""
    click.echo(f"ok: {r['stages']} stages verified{tail}")
    who = f"model {r['name']!r} version {r['version']}" if r.get("name") is not None else \
        "no model name or version (made before they existed)"
    sig = ", signature valid" if r.get("signed") else ""
    click.echo(f"manifest sha256:{r['manifest_sha256']} ({who}{sig})")


@main.command()
@click.argument("package")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="An input array (repeat for each input) [default: synthetic inputs].")
@click.option("-s", "--stage", type=int, default=None,
              help="Stop at this stage [default: the last].")
@click.option("--strategy", type=click.Choice(["swap", "inplace", "auto"]), default="swap",
              show_default=True, help="How stages are patched into the live session (auto: "
              "inplace when the memory left would not hold a swap).")
@_trust_options(rollback=True)
@_friendly
def run(package, inputs, stage, strategy, expect, trust, allow_rollback) -> None:
    """Serve PACKAGE in onnxruntime from the base, upgrade it live, print each stage's outputs.

    PACKAGE is a package directory or an http(s) URL. For each stage: when it became active
    (seconds since start) and a summary of every output. A package older than the version of
    its model accepted before on this device is refused (--allow-rollback accepts it); the
    version of a package that loads is recorded.
    """
    import time

    import numpy as np

    from .runtime import ProgressiveSession

    t0 = time.perf_counter()
    feed = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected NAME=FILE.npy", param_hint="--input")
        try:
            feed[name] = np.load(path)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{path}: {e}", param_hint="--input") from None
    _quiet_onnxruntime()
    with cleanup_on_sigterm(), \
            ProgressiveSession(package, strategy=strategy, expect=expect, trust=trust or None,
                               allow_rollback=allow_rollback) as sess:
        from .probe import check_feed, synthesize_inputs

        if stage is not None and not 0 <= stage < sess.stages:
            raise click.BadParameter(f"stage {stage} does not exist: {package} has stages "
                                     f"0..{sess.stages - 1}", param_hint="--stage")

        probe = getattr(sess, "_probe", None)
        if feed:
            check_feed(sess.get_inputs(), feed)
        elif probe is not None and probe.feed:
            feed = dict(probe.feed)  # the inputs the encoder found the model runs on
        else:
            try:  # the shapes come from the package's base.onnx: bounded there
                feed = synthesize_inputs(sess.get_inputs())
            except ValueError as e:
                raise click.ClickException(f"{package}: cannot make inputs for the model: "
                                           f"{e} (pass them with --input)") from None
        names = [o.name for o in sess.get_outputs()]
        if strategy == "auto":
            click.echo(f"strategy {sess.strategy_reason}", err=True)

        def report(k: int) -> None:
            try:
                outs = sess.run(None, feed)
            except P2UError:
                raise
            except Exception as e:  # onnxruntime's errors: one line, not a traceback
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise click.ClickException(f"stage {k}: the model failed on these inputs: "
                                           f"{msg}") from None
            click.echo(f"stage {k} active at {time.perf_counter() - t0:.3f} s")
            for name, out in zip(names, outs):
                a = np.asarray(out)
                if a.dtype.kind == "f" and a.size:
                    click.echo(f"  {name}: shape {list(a.shape)} mean {a.mean():.6g} "
                               f"min {a.min():.6g} max {a.max():.6g} argmax {int(a.argmax())}")
                else:
                    click.echo(f"  {name}: shape {list(a.shape)} {a.reshape(-1)[:8]}")

        report(0)
        last = sess.stages - 1 if stage is None else stage
        for k in range(1, last + 1):
            sess.upgrade(until=k, background=False)
            report(k)


@main.command()
@click.option("--stages", default="4,8,lossless", show_default=True, help="Plan to demonstrate.")
@_friendly
def demo(stages) -> None:
    """Encode the bundled digits CNN and show it upgrading stage by stage."""
    from .demo import run_demo

    run_demo(stages, echo=click.echo)


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Private key file to write (KEY); the public key goes to KEY.pub.")
@click.option("-f", "--force", is_flag=True, help="Replace KEY and KEY.pub if they exist.")
@_friendly
def keygen(output, force) -> None:
    """Make an Ed25519 key pair to sign packages with (needs p2u-onnx[sign]).

    KEY (mode 0600) signs (p2u sign --key KEY); give KEY.pub, or the line it holds, to devices
    (--trust KEY.pub, ProgressiveSession(..., trust=...)).
    """
    from .trust import generate_key

    public = generate_key(output, overwrite=force)
    click.echo(f"wrote {output} (private: keep it secret) and {output}.pub")
    click.echo(f"public key: {public}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-k", "--key", "keys", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Private key file from p2u keygen (repeat to sign with several).")
@click.option("--expires", default="never", show_default=True,
              help="When the signature stops being accepted: a duration (30d, 12h, 2w), an ISO "
                   "date or time (UTC), or 'never'. Devices then refuse the package until it is "
                   "signed again, so a mirror cannot keep serving an old release forever.")
@_friendly
def sign(package, keys, expires) -> None:
    """Sign PACKAGE: write PACKAGE/manifest.json.sig (needs p2u-onnx[sign]).

    The signature covers manifest.json's sha256 (so every file of the package), the model name,
    the version and the expiry. The package stays plain static files; serve it as before.
    Run p2u verify PACKAGE first: signing vouches for what is there.
    """
    from .trust import sign_package

    path, signed = sign_package(package, keys, expires)
    until = signed["expires"] or "never"
    click.echo(f"wrote {path}: model {signed['name']!r} version {signed['version']}, "
               f"expires {until}")
    click.echo(f"manifest sha256:{signed['manifest_sha256']}")


@main.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-m", "--model", "original", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The original ONNX model to compare with [default: the "
                                 "package's last stage, when it is lossless].")
@click.option("--inputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An .npz with one array per model input name: arrays of the input's rank "
                   "are one feed (or one per fixed-size batch), arrays with one more leading "
                   "axis one feed per index [default: the package's probe inputs].")
@click.option("--synth", is_flag=True,
              help="Synthesize inputs from the model's signature, as the encoder does.")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Split the --inputs arrays into feeds of this many rows (first axis).")
@click.option("-s", "--stage", "stages", type=int, multiple=True,
              help="Evaluate this stage (repeat for several) [default: every stage].")
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Timed runs per feed and stage, after an untimed pass for the metrics "
                   "[default: enough for 20 timed runs per stage, at least one per feed].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def evaluate(package, original, inputs, synth, batch, stages, repeats, as_json) -> None:
    """Check PACKAGE against its original model: per stage, agreement, cosine and max error of
    the outputs on the same inputs, and latency, in plain onnxruntime (CPU).

    Agreement is top-1 (argmax of the last axis) for class-score outputs; cosine is per sample
    (row), then the mean; with several outputs the table shows the worst. Latency is measured
    interleaved across stages; 'x orig' is the stage's median over the original's.
    """
    from .evaluation import evaluate as do_evaluate

    if inputs is not None and synth:
        raise click.UsageError("give --inputs or --synth, not both")
    if batch is not None and inputs is None:
        raise click.UsageError("--batch splits the arrays of --inputs")
    _quiet_onnxruntime()
    r = do_evaluate(package, original, inputs, stages=stages or None, repeats=repeats,
                    synth=synth, batch=batch)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    ref = r["reference_latency_ms"]
    ints = any(s["exact_match"] is not None for s in r["stages"])  # integer outputs

    def exact(v):
        return f" {num(v, '.3f'):>6}" if ints else ""

    exact_head = f" {'exact':>6}" if ints else ""

    click.echo(f"{'stage':>5} {'bits':>8} {'bytes':>10} {'share':>7} {'agree':>7} {'cosine':>8}"
               f" {'max err':>9}{exact_head} {'ms':>8} {'x orig':>6}")
    for s in r["stages"]:
        bits = s["bits"] if s["mean_bits"] is None else f"{s['mean_bits']:.2f}"
        click.echo(f"{s['stage']:>5} {bits!s:>8} {_fmt_bytes(s['cumulative_bytes']):>10} "
                   f"{num(s['share'], '.1%'):>7} {num(s['agreement'], '.4f'):>7} "
                   f"{num(s['cosine'], '.5f'):>8} {num(s['max_abs_error'], '.3g'):>9} "
                   f"{exact(s['exact_match'])} {num(s['latency_ms']['median'], '.3f'):>8} "
                   f"{num(s['latency_ratio'], '.2f'):>6}")
    click.echo(f"{'orig':>5} {'':>8} {'':>10} {'':>7} {'':>7} {'':>8} {'':>9}"
               f"{' ' * 7 if ints else ''} {num(ref['median'], '.3f'):>8} {'1.00':>6}")
    click.echo(f"bytes: to reach the stage; share: of the {r['share_of']}; bits: mean per coded "
               f"weight; ms: median of {r['repeats'] * r['inputs']['feeds']} timed runs")
    for note in r["notes"]:
        click.echo(f"note: {note}")


main.add_command(_serve_command, "serve")
main.add_command(_fetch_command, "fetch")

if __name__ == "__main__":  # pragma: no cover
    main()

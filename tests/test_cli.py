"""The p2u command: happy paths, and one-line errors with a non-zero exit (no traceback)."""

import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

import synth
from p2u_onnx.cli import main


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(p))
    return p


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_encode_inspect_restore_verify(model, tmp_path):
    pkg = tmp_path / "m.p2u"
    r = invoke("encode", model, "-o", pkg, "--stages", "4,8,lossless", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("inspect", pkg, "--json")
    info = json.loads(r.output)
    assert [s["stage"] for s in info["stages"]] == [0, 1, 2]
    r = invoke("inspect", pkg)
    assert "lossless" in r.output and "share" in r.output
    r = invoke("restore", pkg, "--stage", 1, "-o", tmp_path / "s1.onnx")
    assert r.exit_code == 0 and (tmp_path / "s1.onnx").exists()
    onnx.checker.check_model(str(tmp_path / "s1.onnx"))
    r = invoke("verify", pkg)
    assert r.exit_code == 0 and "reproduces the source" in r.output


@pytest.mark.parametrize("args,needle", [
    (["encode", "{tmp}/missing.onnx"], "no such file"),
    (["encode", "{junk}"], "not a readable ONNX model"),
    (["encode", "{model}", "--stages", "8,4"], "must rise"),
    (["encode", "{model}", "--stages", "4,banana"], "bad stage"),
    (["inspect", "{tmp}"], "not a p2u package"),
    (["inspect", "{junk}"], "not a p2u package (a file; a package is the directory"),
    (["restore", "{tmp}/nope.p2u", "-o", "{tmp}/x.onnx"], "not a p2u package"),
])
def test_errors_are_one_line(model, tmp_path, args, needle):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    args = [a.format(tmp=tmp_path, model=model, junk=junk) for a in args]
    r = invoke(*args)
    assert r.exit_code != 0
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_altered_package_fails_verify(model, tmp_path):
    pkg = tmp_path / "m.p2u"
    invoke("encode", model, "-o", pkg, "-q")
    p = pkg / "stage-1.p2u"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    r = invoke("verify", pkg)
    assert r.exit_code == 1 and "stage-1.p2u" in r.output


def test_verify_bounds_the_base_before_decoding_it(model, tmp_path, monkeypatch):
    """verify decodes the base files inside stage 0: a declared size the memory left cannot
    hold is refused by name before a byte is decoded (a small stage can declare a huge file)."""
    from p2u_onnx import reconstruct
    from p2u_onnx.format import load_manifest

    pkg = tmp_path / "m.p2u"
    invoke("encode", model, "-o", pkg, "-q")
    assert invoke("verify", pkg).exit_code == 0
    name, size = max(((f["path"], f["size"]) for f in load_manifest(pkg)["base_model"]["files"]),
                     key=lambda f: f[1])
    monkeypatch.setattr(reconstruct, "memory_left", lambda: (2 * size - 1, "a test limit"))
    r = invoke("verify", pkg)
    assert r.exit_code == 1 and f"{name} inside stage-0.p2u is {size} bytes" in r.output, r.output


def test_demo_runs_as_a_user_would():
    r = subprocess.run([sys.executable, "-m", "p2u_onnx.cli", "demo"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "identical to the original" in r.stdout


def test_run_prints_every_stage(model, tmp_path):
    import numpy as np

    pkg = tmp_path / "m.p2u"
    invoke("encode", model, "-o", pkg, "-q")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 64), np.float32))
    r = invoke("run", pkg, "--input", f"x={x}")
    assert r.exit_code == 0, r.output
    assert [l.split(" active")[0] for l in r.output.splitlines() if "active" in l] == \
        ["stage 0", "stage 1", "stage 2"]
    r = invoke("run", pkg, "--stage", 1)
    assert "stage 1 active" in r.output and "stage 2" not in r.output
    for bad in (3, -1):
        r = invoke("run", pkg, "--stage", bad)
        assert r.exit_code == 2 and f"stage {bad} does not exist" in r.output
        assert "has stages 0..2" in r.output and "active" not in r.output


@pytest.mark.parametrize("array,name,needle", [
    ("ones((2, 64), float32)", "y", "the model has no input 'y'; its inputs are 'x'"),
    ("ones((2, 64, 1), float32)", "x", "input 'x' has shape [2, 64, 1]; the model expects"),
    ("ones((2, 63), float32)", "x", "has shape [2, 63]; the model expects [?, 64]"),
    ("ones((2, 64), int64)", "x", "input 'x' is int64; the model expects float32"),
])
def test_run_names_what_is_wrong_with_an_input(model, tmp_path, array, name, needle):
    import numpy as np

    pkg = tmp_path / "m.p2u"
    invoke("encode", model, "-o", pkg, "-q")
    x = tmp_path / "x.npy"
    np.save(x, eval(array, {"ones": np.ones, "float32": np.float32, "int64": np.int64}))
    r = invoke("run", pkg, "--input", f"{name}={x}")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert needle in r.output, r.output


def test_run_reports_a_failing_inference_in_one_line(model, tmp_path, monkeypatch):
    from p2u_onnx.runtime import ProgressiveSession

    pkg = tmp_path / "m.p2u"
    invoke("encode", model, "-o", pkg, "-q")

    def fail(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : index out of range\n"
                           "more detail")

    monkeypatch.setattr(ProgressiveSession, "run", fail)
    r = invoke("run", pkg)
    assert r.exit_code == 1 and r.exception is not None and "Traceback" not in r.output
    assert r.output.strip() == "Error: stage 0: the model failed on these inputs: " \
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : index out of range"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("command", ["encode", "restore"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, tmp_path):
    """Writes past 150 kB fail (RLIMIT_FSIZE: the way a full disk fails a write, without
    needing a small file system): the digits model's 300 kB lossless stage and restored model
    cannot be written. One line naming the file, exit 1, nothing left in the output
    directory."""
    import resource
    import signal
    from pathlib import Path

    digits = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
    pkg, out = tmp_path / "d.p2u", tmp_path / "out"
    out.mkdir()
    if command == "restore":
        assert invoke("encode", digits, "-o", pkg, "-q").exit_code == 0
        target = out / "d.onnx"
        args = ["restore", pkg, "-o", target]
    else:
        target = out / "d.p2u"
        args = ["encode", digits, "-o", target, "-q", "--fixed-bits", "--no-probe"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    r = subprocess.run([sys.executable, "-m", "p2u_onnx.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=120, preexec_fn=small_disk)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"Error: cannot write {target}") and "too large" in lines[0]
    assert list(out.iterdir()) == []

"""A second attack suite on local packages, written as an attacker would: every package here
is real (encoded, then altered) and, unless a test says otherwise, resealed so that every
sha256 the manifest lists matches. Some attacks go further and rewrite the stage files too
(``rebind``: every stage header names the altered manifest), which only a pin or a signature
can refuse; for those the checks asked for are that nothing leaves the folder, nothing
exhausts the machine and every refusal is one line.

Each test asserts the refusal by type and message (or, for a harmless change, that the
weights are bit for bit those of the untouched package) and that nothing outside the test's
temporary root changed."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from p2u_onnx import api
from p2u_onnx.codecs import ZstdCodec, ZstdRefCodec
from p2u_onnx.errors import FormatError, IntegrityError, P2UError
from p2u_onnx.format import MAGIC, StageWriter, manifest_binding, read_stage
from p2u_onnx.runtime import BytesSource, ProgressiveSession
from test_format_attacks import (ROOT, _rlimited, built, manifest, one_line,  # noqa: F401
                                 pkg, ppkg, refused, reseal, session_refuses, snapshot,
                                 write_manifest)


# ---------------------------------------------------------------- a full attacker's tools


def stage_parts(path: Path) -> tuple[dict, list[tuple[dict, bytes]]]:
    """The header of a stage file and its entries with their (still coded) bytes."""
    sf = read_stage(path.read_bytes(), verify_payload=False)
    return sf.header, [(dict(e), bytes(sf.data(e))) for e in sf.entries]


def write_stage(path: Path, header: dict, parts: list[tuple[dict, bytes]],
                binding: str | None = None) -> None:
    """Write a stage file from entries and bytes (offsets, lengths, payload digest redone)."""
    w = StageWriter(path, header["package_id"], header["stage"],
                    manifest_binding=binding or header["manifest_binding"])
    for e, data in parts:
        w.add({k: v for k, v in e.items() if k not in ("offset", "length", "location")}, data)
    w.finish()


def raw_header(path: Path, header: dict) -> None:
    """Replace a stage file's JSON header, keeping its payload (and its payload digest)."""
    raw = path.read_bytes()
    hlen = struct.unpack_from("<I", raw, 12)[0]
    payload = raw[16 + hlen:]
    start = 16 + hlen
    # keep the payload where it was, so the entries' offsets stay right
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > hlen:
        start = -(-(16 + len(head)) // 64) * 64
        for e in header["entries"]:
            e["offset"] += start - (16 + hlen)
        head = json.dumps(header, separators=(",", ":")).encode()
    head = head.ljust(start - 16, b" ")
    version = struct.unpack_from("<I", raw, 8)[0]  # the prefix stays the file's
    path.write_bytes(MAGIC + struct.pack("<II", version, len(head)) + head + payload)


def rebind(p: Path, base_onnx: bytes | None = None, base_bin: bytes | None = None) -> dict:
    """The full attacker: new base files (optional), stage 0 carrying them, every stage header
    naming the manifest as it is now, every size and sha256 resealed."""
    if base_onnx is not None:
        (p / "base.onnx").write_bytes(base_onnx)
    if base_bin is not None:
        (p / "base.bin").write_bytes(base_bin)
    m = reseal(p)
    b = manifest_binding(m)
    for k in range(len(m["stages"])):
        path = p / f"stage-{k}.p2u"
        header, parts = stage_parts(path)
        if k == 0:
            parts = [({**e, "codec": {"id": "zstd", "level": 1},
                       "raw_length": len((p / e["name"]).read_bytes()),
                       "sha256": hashlib.sha256((p / e["name"]).read_bytes()).hexdigest()},
                      ZstdCodec(level=1).encode((p / e["name"]).read_bytes()))
                     for e, _ in parts]
        write_stage(path, header, parts, b)
    return reseal(p)


def restage(p: Path, k: int, change) -> dict:
    """Rewrite stage ``k``: ``change(header, parts)`` returns the new parts (it may edit the
    header); then reseal the manifest (the stage table is not bound to the stage files)."""
    path = p / f"stage-{k}.p2u"
    header, parts = stage_parts(path)
    parts = change(header, parts)
    write_stage(path, header, parts)
    return reseal(p)


def base_model(p: Path) -> onnx.ModelProto:
    return onnx.load(str(p / "base.onnx"), load_external_data=False)


def restored(p: Path, out: Path, stage: int | None = None) -> dict[str, bytes]:
    api.restore(p, out, stage)
    m = onnx.load(str(out))
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def every_entry_refuses(p: Path, match: str | None = None, err=P2UError,
                        from_bytes: bool = True, inspect: bool = False) -> None:
    """verify, restore (every stage), open_stages, sessions from the folder and from bytes."""
    m = manifest(p)
    if inspect:
        refused(lambda: api.inspect(p), err, match)
    refused(lambda: api.verify(p), err, match)
    for k in range(len(m["stages"])):
        out = p.parent / f"out-{k}.onnx"
        try:
            api.restore(p, out, k)
        except P2UError as e:
            one_line(e)
    refused(lambda: api.restore(p, p.parent / "out.onnx"), err, match)
    refused(lambda: api.open_stages(p), err, match)
    session_refuses(p, match)
    if from_bytes:
        def go():
            src = BytesSource((p / "manifest.json").read_bytes(),
                              (p / "stage-0.p2u").read_bytes(),
                              fetch=lambda k: (p / f"stage-{k}.p2u").read_bytes())
            with ProgressiveSession(src, verify=False) as s:
                s.upgrade(background=False)
        refused(go, err, match)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (so onnxruntime's own log lines would show)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); " \
           "from p2u_onnx.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout)


def cli_one_line(r: subprocess.CompletedProcess, match: str | None = None) -> str:
    """Exit code 1 or 2 and one line on stderr (``p2u run`` may have printed stage 0's
    outputs on stdout before a later stage was refused)."""
    out = r.stderr.strip()
    assert r.returncode in (1, 2), (r.returncode, r.stdout + r.stderr)
    assert "Traceback" not in r.stdout + out and out.count("\n") == 0, r.stdout + out
    assert out.startswith("Error:"), out
    if match:
        assert match in out, out
    return out


# ---------------------------------------------------------------- class 9: shared files


def test_hard_linked_package_files_are_read_as_they_are(built, tmp_path):
    """A user's ``cp -al``: every file of the package has a second link. verify, restore
    (stage 0 too) and a session work, and no file of the package changes."""
    p = tmp_path / "root" / "m.p2u"
    shutil.copytree(built["probe"], p)
    links = tmp_path / "links"
    links.mkdir()
    for f in p.iterdir():
        os.link(f, links / f.name)
    before = snapshot(tmp_path / "root")
    assert api.verify(p)["lossless_match"] is True
    api.restore(p, tmp_path / "s0.onnx", 0)
    api.restore(p, tmp_path / "s2.onnx")
    with ProgressiveSession(p) as s:
        assert s.upgrade(background=False) == 2
    r = run_cli("verify", str(p))
    assert r.returncode == 0, r.stdout + r.stderr
    after = snapshot(tmp_path / "root")
    assert {k: v for k, v in after.items() if "s0.onnx" not in k and "s2.onnx" not in k} \
        == before
    assert all(os.stat(f).st_nlink == 2 for f in p.iterdir())


def test_a_read_only_package_folder_is_read(built, tmp_path):
    p = tmp_path / "root" / "m.p2u"
    shutil.copytree(built["probe"], p)
    for f in p.iterdir():
        os.chmod(f, 0o444)
    os.chmod(p, 0o555)
    try:
        before = snapshot(tmp_path / "root")
        assert api.verify(p)["lossless_match"] is True
        api.restore(p, tmp_path / "o.onnx")
        with ProgressiveSession(p) as s:
            assert s.upgrade(background=False) == 2
        assert snapshot(tmp_path / "root") == before
    finally:
        os.chmod(p, 0o755)


def test_restore_refuses_a_missing_output_folder(pkg, tmp_path):
    missing = tmp_path / "missing" / "dir" / "x.onnx"
    refused(lambda: api.restore(pkg, missing), P2UError, "does not exist")
    assert not (tmp_path / "missing").exists()
    r = run_cli("restore", str(pkg), "-o", str(missing))
    cli_one_line(r, "does not exist")
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- class 1: out of the folder


def test_manifest_json_as_a_symlink_is_refused(pkg, tmp_path):
    real = tmp_path / "real-manifest.json"
    shutil.move(pkg / "manifest.json", real)
    os.symlink(real, pkg / "manifest.json")
    for fn in (lambda: api.inspect(pkg), lambda: api.verify(pkg),
               lambda: ProgressiveSession(pkg)):
        refused(fn, P2UError, "symbolic link")


@pytest.mark.parametrize("name", ["manifest.json", "probe.npz", "base.bin", "base.onnx",
                                  "stage-1.p2u"])
def test_a_fifo_anywhere_in_the_package_never_blocks(ppkg, name):
    os.unlink(ppkg / name)
    os.mkfifo(ppkg / name)
    code = f"""
        from p2u_onnx import api
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.errors import P2UError
        for fn in (lambda: api.verify({str(ppkg)!r}),
                   lambda: api.restore({str(ppkg)!r}, {str(ppkg.parent / 'o.onnx')!r}),
                   lambda: ProgressiveSession({str(ppkg)!r}).upgrade(background=False)):
            try:
                fn()
                print("ACCEPTED")
            except P2UError as e:
                assert "\\n" not in str(e)
                print("REFUSED", e)
    """
    out = _rlimited(code, timeout=60)
    # restore needs no probe: it may succeed without reading it
    assert out.count("REFUSED") == (2 if name == "probe.npz" else 3), out


def test_probe_npz_as_a_symlink_is_refused(ppkg, tmp_path):
    real = tmp_path / "real.npz"
    shutil.move(ppkg / "probe.npz", real)
    os.symlink(real, ppkg / "probe.npz")
    refused(lambda: api.verify(ppkg), IntegrityError, "symbolic link")
    refused(lambda: ProgressiveSession(ppkg), IntegrityError, "symbolic link")


def test_a_stage_file_that_is_a_symlink_to_a_device(pkg):
    os.unlink(pkg / "stage-2.p2u")
    os.symlink("/dev/zero", pkg / "stage-2.p2u")
    every_entry_refuses(pkg, "symbolic link", from_bytes=False)


def test_package_folder_itself_through_a_symlink_is_fine(built, tmp_path):
    real = tmp_path / "real.p2u"
    shutil.copytree(built["noprobe"], real)
    os.symlink(real, tmp_path / "link.p2u")
    assert api.verify(tmp_path / "link.p2u")["lossless_match"] is True


def _set_external(model: onnx.ModelProto, name: str, **keys: str) -> None:
    t = next(x for x in model.graph.initializer if x.name == name)
    for e in t.external_data:
        if e.key in keys:
            e.value = keys[e.key]


@pytest.mark.parametrize("location", [
    "base%2Ebin", "..%2Fsecret.bin", "base.bin\u200b", "BASE.BIN", "base.bin/", "./base.bin",
    "base.bin\x00", "\uff42ase.bin", "file:base.bin", "base.bin ", "~/base.bin",
    "C:\\base.bin", "base.bin/../base.bin"])
def test_base_onnx_location_tricks(pkg, location):
    m = base_model(pkg)
    name = next(t.name for t in m.graph.initializer if t.name.endswith("__p2u_q"))
    _set_external(m, name, location=location)
    rebind(pkg, m.SerializeToString())
    before = snapshot(pkg.parent)
    every_entry_refuses(pkg, "keeps its data in")
    assert snapshot(pkg.parent) == before


@pytest.mark.parametrize("offset,length", [
    ("-1", None), (None, "-4"), ("99999999999999999999999", None), (None, "1" * 40),
    ("1_0", None), (" 0", None), ("+0", None), ("0x0", None), ("\u0660", None),
    ("1e3", None), ("", None)])
def test_base_onnx_offsets_and_lengths_that_are_not_plain_numbers(pkg, offset, length):
    m = base_model(pkg)
    name = next(t.name for t in m.graph.initializer if t.name.endswith("__p2u_q"))
    t = next(x for x in m.graph.initializer if x.name == name)
    keys = {e.key: e.value for e in t.external_data}
    _set_external(m, name, offset=offset if offset is not None else keys.get("offset", "0"),
                  length=length if length is not None else keys["length"])
    rebind(pkg, m.SerializeToString())
    every_entry_refuses(pkg, name)


def test_base_onnx_duplicated_external_data_keys(pkg):
    """Two ``location`` keys: whichever a loader takes, p2u refuses the tensor."""
    m = base_model(pkg)
    t = next(x for x in m.graph.initializer if x.name.endswith("__p2u_q"))
    e = t.external_data.add()
    e.key, e.value = "location", "base.bin"
    t.external_data.insert(0, onnx.StringStringEntryProto(key="location",
                                                          value="../secret.bin"))
    rebind(pkg, m.SerializeToString())
    every_entry_refuses(pkg, t.name)


def test_base_onnx_overlapping_external_spans(pkg):
    m = base_model(pkg)
    ts = [x for x in m.graph.initializer if x.data_location == TensorProto.EXTERNAL]
    a, b = ts[0], ts[1]
    off_a = next(e.value for e in a.external_data if e.key == "offset")
    for e in b.external_data:
        if e.key == "offset":
            e.value = off_a
    rebind(pkg, m.SerializeToString())
    every_entry_refuses(pkg)


def test_base_onnx_external_data_in_a_constant_node_and_a_subgraph(pkg):
    m = base_model(pkg)

    def ext(name, location):
        t = TensorProto(name=name, data_type=1, dims=[4])
        for k, v in (("location", location), ("offset", "0"), ("length", "16")):
            t.external_data.add(key=k, value=v)
        t.data_location = TensorProto.EXTERNAL
        return t

    inner = helper.make_graph([helper.make_node("Constant", [], ["c"],
                                                value=ext("deep", "../secret.bin"))],
                              "inner", [], [helper.make_tensor_value_info("c", 1, [4])])
    m.graph.node.append(helper.make_node("If", ["cond_never"], ["unused"],
                                         then_branch=inner, else_branch=inner))
    rebind(pkg, m.SerializeToString())
    every_entry_refuses(pkg, "../secret.bin")


def test_base_onnx_tensor_given_twice_in_one_attribute_is_refused(pkg):
    """protobuf merges a message field given twice: the tensor a loader sees combines the
    keys of both (offset of one, length of the other). Each half alone looks fine."""
    m = base_model(pkg)
    size = manifest(pkg)["base_model"]["files"][1]["size"]

    def half(**kv):
        t = TensorProto(name="k", data_type=2, dims=[4])
        for k, v in kv.items():
            t.external_data.add(key=k, value=v)
        t.data_location = TensorProto.EXTERNAL
        return t.SerializeToString()

    node = helper.make_node("Constant", [], ["k_out"])
    attr = onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR)
    raw_attr = attr.SerializeToString()
    for h in (half(location="base.bin", offset=str(size - 4), length="4"),
              half(location="base.bin", length=str(size))):
        raw_attr += b"\x2a" + _varint(len(h)) + h  # field 5 (t), wire type 2
    node.attribute.append(onnx.AttributeProto.FromString(raw_attr))
    m.graph.node.append(node)
    rebind(pkg, m.SerializeToString())
    every_entry_refuses(pkg)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def test_base_onnx_bias_with_a_huge_declared_shape_is_bounded(pkg):
    """A plain tensor (not coded: a bias kept in base.onnx) whose dims say 2**40 values but
    that holds its real few bytes: nothing may try to allocate what the dims say."""
    m = base_model(pkg)
    t = next(x for x in m.graph.initializer if x.data_location != TensorProto.EXTERNAL)
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20])
    rebind(pkg, m.SerializeToString())
    out = _rlimited(f"""
        from p2u_onnx import api
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.errors import P2UError
        for fn in (lambda: api.verify({str(pkg)!r}),
                   lambda: api.restore({str(pkg)!r}, {str(pkg.parent / 'o.onnx')!r}, 0),
                   lambda: ProgressiveSession({str(pkg)!r})):
            try:
                fn()
                print("ACCEPTED")
            except P2UError as e:
                assert "\\n" not in str(e), str(e)
                print("REFUSED", e)
    """, limit=2 << 30)
    # restore of stage 0 writes base.onnx as it is (it does not load it): bounded either way
    lines = out.splitlines()
    assert len(lines) == 3 and out.count("REFUSED") >= 2, out


# ---------------------------------------------------------------- class 2: one changed digit


def _leaves(v, path=()):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _leaves(x, path + (k,))
    elif isinstance(v, list) and v:
        for i, x in enumerate(v):
            yield from _leaves(x, path + (i,))
    else:
        yield path, v


def _one_digit(v):
    """The value with one digit (or character, or truth value) changed."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1 if v % 10 != 9 else v - 1
    if isinstance(v, float):
        return v * 1.5 + 1e-3
    if isinstance(v, str) and v:
        for i, ch in enumerate(v):
            if ch.isdigit():
                return v[:i] + str((int(ch) + 1) % 10) + v[i + 1:]
        return v[:-1] + ("b" if v[-1] != "b" else "c")
    return "x" if v is None else None


@pytest.fixture(scope="module")
def clean_weights(built, tmp_path_factory) -> dict[int, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("clean")
    n = len(manifest(built["noprobe"])["stages"])
    return {k: restored(built["noprobe"], d / f"s{k}.onnx", k) for k in range(1, n)}


def test_one_changed_digit_anywhere_in_the_manifest(built, tmp_path, clean_weights):
    """Every leaf of a --no-probe package's manifest (but its notes), changed by one digit and
    every sha256 resealed: each restored stage is either refused in one line or bit for bit
    the untouched package's. Never silently different weights."""
    m0 = manifest(built["noprobe"])
    silent, tried = [], 0
    for path, value in _leaves(m0):
        if path[0] == "notes":
            continue
        # the sha256 and size of a listed file are what reseal rewrites: change the file
        if path[-1] in ("sha256", "size") and path[0] in ("stages", "base_model", "probe"):
            continue
        tried += 1
        p = tmp_path / f"m{tried}" / "m.p2u"
        shutil.copytree(built["noprobe"], p)
        m = copy.deepcopy(m0)
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = _one_digit(value)
        write_manifest(p, m)
        reseal(p, m)
        for stage, want in clean_weights.items():
            try:
                got = restored(p, p.parent / f"s{stage}.onnx", stage)
            except P2UError as e:
                one_line(e)
                continue
            if got != want:
                silent.append((path, stage))
        shutil.rmtree(p.parent)
    assert tried > 60, tried
    assert not silent, silent


def _stage_header_attack(p: Path, k: int, change) -> None:
    """Change stage ``k``'s header only (payload kept); reseal the manifest's stage table."""
    path = p / f"stage-{k}.p2u"
    header = read_stage(path.read_bytes(), verify_payload=False).header
    header = copy.deepcopy(header)
    change(header)
    raw_header(path, header)
    reseal(p)


def _refines(h):
    return [e for e in h["entries"] if e["kind"] != "file"]


STAGE_HEADER_ATTACKS = {
    "shift +1": (1, lambda h: [e.__setitem__("shift", e["shift"] + 1) for e in _refines(h)]),
    "shift of the lossless stage": (2, lambda h: _refines(h)[0].__setitem__("shift", 0)),
    "kind refine -> exact": (1, lambda h: _refines(h)[0].__setitem__("kind", "exact")),
    "codec int-planes -> int-groups": (
        1, lambda h: _refines(h)[0]["codec"].__setitem__("id", "int-groups")),
    "codec graph zstd -> segments": (
        1, lambda h: next(e for e in h["entries"] if e["kind"] == "file")["codec"].update(
            id="segments", segments=[])),
    "names of two tensors swapped": (1, lambda h: _swap_names(_refines(h))),
    "blocks shifted by one": (
        1, lambda h: _refines(h)[0].__setitem__("blocks", [1, _refines(h)[0]["blocks"][1] + 1])),
    "stage number": (1, lambda h: h.__setitem__("stage", 2)),
    "graph.onnx renamed base.onnx": (
        1, lambda h: next(e for e in h["entries"] if e["kind"] == "file").__setitem__(
            "name", "base.onnx")),
    "graph.onnx entry made a refine": (
        1, lambda h: next(e for e in h["entries"] if e["kind"] == "file").update(
            kind="refine", blocks=[0, 1], shift=4, codec={"id": "int-planes", "level": 3})),
    "raw_length of graph.onnx": (
        1, lambda h: next(e for e in h["entries"] if e["kind"] == "file").__setitem__(
            "raw_length", 1 << 39)),
    "location of an entry": (1, lambda h: _refines(h)[0].__setitem__("location", "stage-2.p2u")),
    "stage 0 base.bin entry renamed": (0, lambda h: h["entries"][1].__setitem__("name",
                                                                              "graph.onnx")),
    "stage 0 segments swapped": (0, lambda h: h["entries"][1]["codec"].__setitem__(
        "segments", h["entries"][1]["codec"]["segments"][1:2] +
        h["entries"][1]["codec"]["segments"][0:1] + h["entries"][1]["codec"]["segments"][2:])),
    "stage 0 segment kinds changed": (0, lambda h: [s.__setitem__(2, "bytes") for s in
                                                    h["entries"][1]["codec"]["segments"]]),
    "stage 0 base.onnx raw_length": (0, lambda h: h["entries"][0].__setitem__(
        "raw_length", h["entries"][0]["raw_length"] + 1)),
    "codec level": (1, lambda h: [e["codec"].__setitem__("level", -7) for e in _refines(h)]),
    "payload digest": (1, lambda h: h.__setitem__("payload_sha256", "0" * 64)),
    "binding": (1, lambda h: h.__setitem__("manifest_binding", "0" * 64)),
    "format version 1 without binding": (1, lambda h: (h.pop("manifest_binding"),
                                                       h.__setitem__("format_version", 1))),
}


def _swap_names(entries):
    a = entries[0]["name"]
    b = next(e["name"] for e in entries if e["name"] != a)
    for e in entries:
        e["name"] = b if e["name"] == a else a if e["name"] == b else e["name"]


@pytest.mark.parametrize("what", list(STAGE_HEADER_ATTACKS))
def test_stage_header_fields_cannot_change_the_weights(pkg, what, clean_weights):
    """A stage header edited (payload kept) and the manifest's stage table resealed: refused
    in one line, or (a field decoding does not use) bit for bit the same weights."""
    k, change = STAGE_HEADER_ATTACKS[what]
    _stage_header_attack(pkg, k, change)
    before = snapshot(pkg.parent)
    n = len(manifest(pkg)["stages"])
    refusals = 0
    for stage in range(max(k, 1), n):
        try:
            got = restored(pkg, pkg.parent / f"s{stage}.onnx", stage)
        except P2UError as e:
            one_line(e)
            refusals += 1
            continue
        assert got == clean_weights[stage], f"{what}: stage {stage} silently differs"
    if not refusals and k > 0:
        # a field decoding does not use (a codec level; the payload digest, which the whole
        # file's sha256 in the manifest supersedes): the same weights, served
        with ProgressiveSession(pkg, verify=False) as s:
            assert s.upgrade(background=False) == n - 1
    elif k == 0:  # a folder's session reads base.onnx and base.bin, not stage 0
        refused(lambda: api.verify(pkg))
        refused(lambda: ProgressiveSession(BytesSource((pkg / "manifest.json").read_bytes(),
                                                       (pkg / "stage-0.p2u").read_bytes())))
    else:
        session_refuses(pkg)
    after = snapshot(pkg.parent)
    assert {f: v for f, v in after.items() if not f.endswith(".onnx")} == \
        {f: v for f, v in before.items() if not f.endswith(".onnx")}


def test_a_stage_that_leaves_a_tensor_out(pkg, clean_weights):
    """Stage 1 rewritten without the entries of one tensor (payload too): that tensor would
    silently stay at its base values."""
    def drop(header, parts):
        first = next(e["name"] for e, _ in parts if e["kind"] == "refine")
        return [(e, d) for e, d in parts if e["name"] != first]
    restage(pkg, 1, drop)
    every_entry_refuses(pkg, "does not update")


def test_a_stage_that_carries_a_second_graph(pkg):
    """Stage 2 rewritten to carry a graph.onnx of its own: only stage 1 carries the skeleton."""
    g = next((e, d) for e, d in stage_parts(pkg / "stage-1.p2u")[1] if e["kind"] == "file")
    restage(pkg, 2, lambda h, parts: parts + [g])
    every_entry_refuses(pkg, "graph.onnx")


def test_duplicated_entries_in_a_stage(pkg):
    def dup(header, parts):
        first = next(p for p in parts if p[0]["kind"] == "refine")
        return [first] + parts
    restage(pkg, 1, dup)
    every_entry_refuses(pkg, "block range")


# ---------------------------------------------------------------- class 5: bombs, every codec


def _zstd_bomb(gib: float = 2) -> bytes:
    """A zstd frame of a few dozen KB that expands to ``gib`` GiB of zeros (no content size)."""
    import zstandard

    c = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(16 << 20)
    return b"".join(c.compress(zeros) for _ in range(int(gib * 64))) + c.flush()


def _every_path_bounded(p: Path, limit: int = 1 << 30) -> str:
    """verify, restore, sessions from the folder and from bytes, under an address-space
    limit: each refuses in one line (never MemoryError, never killed)."""
    out = _rlimited(f"""
        from pathlib import Path
        from p2u_onnx import api
        from p2u_onnx.runtime import BytesSource, ProgressiveSession
        from p2u_onnx.errors import P2UError
        p = Path({str(p)!r})

        def folder():
            with ProgressiveSession(p, verify=False) as s:
                s.upgrade(background=False)

        def from_bytes():
            src = BytesSource((p / "manifest.json").read_bytes(),
                              (p / "stage-0.p2u").read_bytes(),
                              fetch=lambda k: (p / f"stage-{{k}}.p2u").read_bytes())
            with ProgressiveSession(src, verify=False) as s:
                s.upgrade(background=False)

        for fn in (lambda: api.verify(p), lambda: api.restore(p, p.parent / "o.onnx"),
                   folder, from_bytes):
            try:
                fn()
                print("ACCEPTED")
            except P2UError as e:
                assert "\\n" not in str(e), str(e)
                print("REFUSED", e)
    """, limit=limit, timeout=120)
    assert out.count("REFUSED") == 4, out
    return out


def test_zstd_bomb_as_the_skeleton_graph(pkg):
    bomb = _zstd_bomb()

    def change(header, parts):
        return [({**e, "raw_length": 4096, "sha256": "0" * 64}, bomb)
                if e["kind"] == "file" else (e, d) for e, d in parts]
    restage(pkg, 1, change)
    out = _every_path_bounded(pkg)
    assert "more than the 4096 bytes" in out, out


def _values(pkg: Path, entry: dict) -> int:
    """How many values (padding included) a stage entry codes."""
    from p2u_onnx.quantizers import Layout

    t = next(t for t in manifest(pkg)["tensors"] if t["name"] == entry["name"])
    b0, b1 = entry["blocks"]
    return (b1 - b0) * Layout.from_json(tuple(t["shape"]), t["layout"]).block_len


def test_zstd_bomb_as_int_planes(pkg):
    """A refine entry that names format 4's int-planes codec (still read in format 5)."""
    bomb = _zstd_bomb()

    def change(header, parts):
        e, d = next(x for x in parts if x[0]["kind"] == "refine")
        e["codec"] = {"id": "int-planes", "level": 3}
        planes = struct.pack("<BQ", 1, len(bomb)) + bomb
        return [(x, planes if x is e else y) for x, y in parts]
    restage(pkg, 1, change)
    out = _every_path_bounded(pkg)
    assert "more than the" in out, out


def test_zstd_bomb_as_int_groups(pkg):
    """The lossless stage's payload as format 4's int-groups: one group that claims every
    value, a bomb for a plane."""
    bomb = _zstd_bomb()

    def change(header, parts):
        e, d = next(x for x in parts if x[0]["kind"] == "exact")
        e["codec"] = {"id": "int-groups", "level": 3}
        total = _values(pkg, e)
        planes = struct.pack("<BQ", 1, len(bomb)) + bomb
        data = struct.pack("<H", 1) + struct.pack("<BQQ", 0, total, len(planes)) + planes
        return [(x, data if x is e else y) for x, y in parts]
    restage(pkg, 2, change)
    out = _every_path_bounded(pkg)
    assert "REFUSED" in out


@pytest.mark.parametrize("stage", [1, 2])
def test_zstd_bomb_as_int_ctx(pkg, stage):
    """Format 5's int-ctx payload (refine and exact): one group of every context that claims
    every value, its plane a bomb: each path stops at the group's size."""
    from p2u_onnx.codecs import _varint

    bomb = _zstd_bomb()

    def change(header, parts):
        e, d = next(x for x in parts if x[0]["kind"] in ("refine", "exact"))
        assert e["codec"]["id"] == "int-ctx"
        data = _varint(1) + _varint(0) + _varint(255) + _varint(_values(pkg, e)) + b"\x01" + \
            _varint(len(bomb) << 1) + bomb
        return [(x, data if x is e else y) for x, y in parts]
    restage(pkg, stage, change)
    out = _every_path_bounded(pkg)
    assert "more than the" in out, out


def test_zstd_bomb_in_the_segments_of_base_bin(pkg):
    """Stage 0's base.bin (segments codec): every stream a bomb. Read from bytes."""
    bomb = _zstd_bomb(1)

    def change(header, parts):
        out = []
        for e, d in parts:
            if e["name"] == "base.bin":
                d = struct.pack("<I8Q", 8, *([len(bomb)] * 8)) + bomb * 8
            out.append((e, d))
        return out
    restage(pkg, 0, change)
    os.unlink(pkg / "base.onnx")  # a session must unpack stage 0 (as from bytes)
    os.unlink(pkg / "base.bin")
    out = _rlimited(f"""
        from pathlib import Path
        from p2u_onnx.runtime import BytesSource, ProgressiveSession
        from p2u_onnx.errors import P2UError
        p = Path({str(pkg)!r})
        for src in (p, BytesSource((p / "manifest.json").read_bytes(),
                                   (p / "stage-0.p2u").read_bytes())):
            try:
                ProgressiveSession(src, verify=False).close()
                print("ACCEPTED")
            except P2UError as e:
                print("REFUSED", e)
    """)
    assert out.count("REFUSED") == 2, out


def test_stage_header_near_the_header_limit(tmp_path):
    """A stage file whose header says 64 MiB (the limit) of JSON values, or 4 GiB: refused
    quickly, in bounded memory."""
    from p2u_onnx.format import MAX_HEADER

    big = tmp_path / "big.p2u"
    body = b"[" + b"0," * ((MAX_HEADER - 2) // 2) + b"0]"
    body = body[:MAX_HEADER - 1] + b"]" if len(body) > MAX_HEADER else body.ljust(MAX_HEADER)
    big.write_bytes(MAGIC + struct.pack("<II", 2, MAX_HEADER) + body)
    huge = tmp_path / "huge.p2u"
    huge.write_bytes(MAGIC + struct.pack("<II", 2, 0xFFFFFFFF) + b"{}")
    strings = tmp_path / "strings.p2u"
    s = b'{"a":"' + b"\\u0041" * ((MAX_HEADER - 16) // 6) + b'"}'
    strings.write_bytes(MAGIC + struct.pack("<II", 2, len(s)) + s)
    out = _rlimited(f"""
        import time
        from p2u_onnx.format import read_stage
        from p2u_onnx.errors import P2UError
        for f in ({str(big)!r}, {str(huge)!r}, {str(strings)!r}):
            t = time.perf_counter()
            try:
                read_stage(f)
                print("ACCEPTED")
            except P2UError as e:
                assert "\\n" not in str(e)
                print("REFUSED", round(time.perf_counter() - t, 2), e)
    """, limit=1 << 30)
    lines = out.splitlines()
    assert len(lines) == 3 and all(ln.startswith("REFUSED") for ln in lines), out
    assert all(float(ln.split()[1]) < 10 for ln in lines), out


def test_probe_npz_bomb_through_a_session(ppkg, tmp_path):
    """The probe is outside the binding: an attacker replaces probe.npz with a zip bomb and
    reseals. A session from the folder refuses it in bounded memory."""
    import zipfile

    from test_format_attacks import _npy_header

    m = manifest(ppkg)
    with zipfile.ZipFile(ppkg / "probe.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for name in [f"out_{s['index']}_0" for s in m["probe"]["stages"]] + ["input_0"]:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                f.write(_npy_header((1 << 26,)))
                for _ in range(16):
                    f.write(bytes(16 << 20))
    reseal(ppkg)
    out = _rlimited(f"""
        from p2u_onnx import api
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.errors import P2UError
        for fn in (lambda: api.verify({str(ppkg)!r}), lambda: ProgressiveSession({str(ppkg)!r})):
            try:
                fn()
                print("ACCEPTED")
            except P2UError as e:
                print("REFUSED", e)
    """)
    assert out.count("REFUSED") == 2, out


def test_probe_npz_with_a_million_members(ppkg):
    """A zip whose central directory lists 700k tiny entries (57 MiB, within the probe's
    64 MiB cap): zipfile's member table took 414 MB and 5 s. Refused before it is built."""
    import zipfile

    buf = Path(ppkg / "probe.npz")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(700_000):
            z.writestr(f"{i:x}", b"")
    reseal(ppkg)
    out = _rlimited(f"""
        from p2u_onnx import api
        from p2u_onnx.errors import P2UError
        try:
            api.verify({str(ppkg)!r})
            print("ACCEPTED")
        except P2UError as e:
            print("REFUSED", e)
        # this process's own peak (ru_maxrss would carry over the parent's across exec)
        print(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))
    """)
    assert out.startswith("REFUSED") and "zip members" in out, out
    assert int(out.split()[-1]) < 300 << 10, out  # KB: the import of onnx and ort, no more


# ---------------------------------------------------------------- class 8: one line, everywhere


def _graph_of(p: Path) -> onnx.ModelProto:
    e, d = next(x for x in stage_parts(p / "stage-1.p2u")[1] if x[0]["kind"] == "file")
    return onnx.load_model_from_string(
        ZstdRefCodec().decode(d, e["raw_length"], (p / "base.onnx").read_bytes())
        if e["codec"]["id"] == "zstd-ref" else ZstdCodec().decode(d, e["raw_length"]))


def _new_graph(p: Path, raw: bytes) -> None:
    def change(header, parts):
        return [({**e, "raw_length": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                  "codec": ZstdCodec(level=1).get_config()},
                 ZstdCodec(level=1).encode(raw)) if e["kind"] == "file" else (e, d)
                for e, d in parts]
    restage(p, 1, change)


def _graph_unknown_op(p: Path) -> None:
    g = _graph_of(p)
    g.graph.node[-1].op_type, g.graph.node[-1].domain = "NoSuchOp", "com.example"
    g.opset_import.add(domain="com.example", version=1)
    _new_graph(p, g.SerializeToString())


def _graph_bad_shapes(p: Path) -> None:
    """A skeleton onnxruntime refuses at load with a long, multi-part message."""
    g = _graph_of(p)
    g.graph.node.append(helper.make_node("MatMul", [g.graph.input[0].name,
                                                    g.graph.input[0].name], ["zz"]))
    g.graph.output.append(helper.make_tensor_value_info("zz", 1, [3, 7, 9]))
    g.graph.node.append(helper.make_node("Reshape", ["zz", "zz"], ["zz2"]))
    _new_graph(p, g.SerializeToString())


MALFORMED = {
    "empty manifest": lambda p: (p / "manifest.json").write_bytes(b""),
    "manifest is a folder": lambda p: ((p / "manifest.json").unlink(),
                                       (p / "manifest.json").mkdir()),
    "tensor entry empty": lambda p: write_manifest(p, {**manifest(p), "tensors": [{}]}),
    "manifest JSON null": lambda p: (p / "manifest.json").write_bytes(b"null"),
    "manifest not UTF-8": lambda p: (p / "manifest.json").write_bytes(b'{"format": "\xff"}'),
    "stage 1 truncated": lambda p: ((p / "stage-1.p2u").write_bytes(
        (p / "stage-1.p2u").read_bytes()[:40]), reseal(p)),
    "stage 1 empty": lambda p: ((p / "stage-1.p2u").write_bytes(b""), reseal(p)),
    "stage 1 header not JSON": lambda p: ((p / "stage-1.p2u").write_bytes(
        MAGIC + struct.pack("<II", 2, 48) + b"{" * 48), reseal(p)),
    "stage 2 missing": lambda p: (p / "stage-2.p2u").unlink(),
    "stage 1 is a folder": lambda p: ((p / "stage-1.p2u").unlink(),
                                      (p / "stage-1.p2u").mkdir()),
    "base.onnx garbage": lambda p: rebind(p, b"\x0a\xff\xff\xff\xff\x0f" + bytes(64)),
    "base.onnx empty": lambda p: rebind(p, b""),
    "base.bin missing": lambda p: (p / "base.bin").unlink(),
    "graph.onnx garbage": lambda p: _new_graph(p, b"\x3a\x05\x0a\x03abc\xff\xff"),
    "graph.onnx unknown op": _graph_unknown_op,
    "graph.onnx bad shapes": _graph_bad_shapes,
}


def _evaluate(p: Path):
    from p2u_onnx.evaluation import evaluate

    return evaluate(p, None, None, synth=True, repeats=1)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_package_is_one_line_on_every_api_entry_point(pkg, case):
    MALFORMED[case](pkg)
    before = snapshot(pkg.parent)
    calls = {
        "inspect": lambda: api.inspect(pkg, tensors=True),
        "verify": lambda: api.verify(pkg),
        "restore": lambda: api.restore(pkg, pkg.parent / "o.onnx"),
        "restore 0": lambda: api.restore(pkg, pkg.parent / "o0.onnx", 0),
        "open_stages": lambda: api.open_stages(pkg),
        "session": lambda: ProgressiveSession(pkg, verify=False).upgrade(background=False),
        "evaluate": lambda: _evaluate(pkg),
    }
    refusals = set()
    for what, fn in calls.items():
        try:
            fn()
        except P2UError as e:
            one_line(e)
            refusals.add(what)
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{case}: {what} raised {type(e).__name__}: {e}")
    # (restore writes a skeleton onnxruntime cannot load as it is: it loads nothing)
    # (a session without base.bin in the folder unpacks the base from stage 0)
    must = {"verify"} if case == "base.bin missing" else {"verify", "session"}
    assert must <= refusals, (case, refusals)
    assert {f: v for f, v in snapshot(pkg.parent).items() if not f.endswith(".onnx")} == \
        {f: v for f, v in before.items() if not f.endswith(".onnx")}


@pytest.mark.parametrize("case", ["graph.onnx unknown op", "graph.onnx bad shapes",
                                  "graph.onnx garbage", "stage 1 truncated"])
def test_malformed_stage_through_bytes_and_apply(pkg, case, tmp_path):
    good = {k: (pkg / f"stage-{k}.p2u").read_bytes() for k in range(3)}
    m_bytes = (pkg / "manifest.json").read_bytes()
    MALFORMED[case](pkg)
    bad = (pkg / "stage-1.p2u").read_bytes()
    # from bytes, with the (resealed) manifest
    src = BytesSource((pkg / "manifest.json").read_bytes(), good[0])
    with ProgressiveSession(src, verify=False) as s:
        for stage in (bad, pkg / "stage-1.p2u"):
            refused(lambda: s.apply(stage))
            assert s.stage == 0
    # the original manifest: the hostile stage does not match its sha256
    with ProgressiveSession(BytesSource(m_bytes, good[0]), verify=False) as s:
        refused(lambda: s.apply(bad), IntegrityError)
        assert s.apply(good[1]) == 1


def test_apply_hostile_inputs(pkg, tmp_path):
    other = tmp_path / "other.p2u"
    from synth import mlp

    import p2u_onnx

    p2u_onnx.encode(mlp(seed=7) if "seed" in mlp.__code__.co_varnames else mlp(), other,
                    "4,8,lossless", probe=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.p2u"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)
    cases = {
        "empty bytes": b"",
        "magic only": MAGIC,
        "garbage": os.urandom(4096),
        "stage 2 first": (pkg / "stage-2.p2u").read_bytes(),
        "stage 0 again": (pkg / "stage-0.p2u").read_bytes(),
        "another package's stage 1": (other / "stage-1.p2u").read_bytes(),
        "a folder": tmp_path,
        "a missing file": tmp_path / "missing.p2u",
        "a FIFO": fifo,
        "a 1 TiB sparse file": sparse,
        "a str path": str(pkg / "stage-2.p2u"),
    }
    with ProgressiveSession(pkg, verify=False, workdir=tmp_path / "work") as s:
        for what, x in cases.items():
            try:
                s.apply(x)
                pytest.fail(f"{what} was applied")
            except P2UError as e:
                one_line(e)
            assert s.stage == 0, what
        assert s.apply(pkg / "stage-1.p2u") == 1
        refused(lambda: s.apply(pkg / "stage-1.p2u"), IntegrityError, "already applied")
        assert s.apply((pkg / "stage-2.p2u").read_bytes()) == 2
        refused(lambda: s.apply(pkg / "stage-2.p2u"), IntegrityError)


@pytest.mark.parametrize("case", ["manifest JSON null", "stage 1 truncated", "base.onnx garbage",
                                  "graph.onnx unknown op", "graph.onnx bad shapes"])
def test_cli_is_one_line_with_no_onnxruntime_log(pkg, case, tmp_path):
    """The real command line in a subprocess: exit code 1 or 2, one line, no traceback, no
    onnxruntime log line, for inspect, verify, restore, run and eval."""
    MALFORMED[case](pkg)
    outs = {}
    for args in (["verify", str(pkg)], ["restore", str(pkg), "-o", str(tmp_path / "o.onnx")],
                 ["run", str(pkg)], ["eval", str(pkg), "--synth"]):
        r = run_cli(*args)
        outs[args[0]] = r
        if args[0] == "restore" and case.startswith("graph.onnx") and r.returncode == 0:
            continue  # restore writes the model; it does not load it
        cli_one_line(r)
    r = run_cli("inspect", str(pkg))
    if r.returncode:
        cli_one_line(r)
    assert "[E:onnxruntime" not in r.stderr and "[W:onnxruntime" not in r.stderr


@pytest.mark.parametrize("value", ["x", [1], {"a": 1}, None, -5, 1.5])
def test_inspect_with_a_malformed_optional_source_field(pkg, value):
    """source.fp32_equivalent_bytes is what inspect divides by: a string made a TypeError."""
    m = manifest(pkg)
    m["source"]["fp32_equivalent_bytes"] = value
    write_manifest(pkg, m)
    from click.testing import CliRunner

    from p2u_onnx.cli import main

    try:
        api.inspect(pkg)
    except P2UError as e:
        assert "fp32_equivalent_bytes" in one_line(e)
    r = CliRunner().invoke(main, ["inspect", str(pkg)])
    assert r.exit_code in (0, 1) and (r.exit_code == 0 or isinstance(r.exception, SystemExit)), \
        (r.output, r.exception)


@pytest.mark.parametrize("key", ["notes", "source.name", "name", "tensors.name"])
def test_control_characters_in_manifest_strings(pkg, key):
    """A note or a name with a newline or a terminal escape: inspect printed it as it was
    (forged lines, escape sequences on the user's terminal), errors carried it."""
    m = manifest(pkg)
    evil = "ok\n\x1b[2J\x1b[1;32mverified\x1b[0m"
    if key == "notes":
        m["notes"] = [evil]
    elif key == "source.name":
        m["source"]["name"] = evil
    elif key == "name":
        m["name"] = evil
    else:
        m["tensors"][0]["name"] = evil
    write_manifest(pkg, m)
    refused(lambda: api.inspect(pkg), FormatError, "control characters")
    every_entry_refuses(pkg, "control characters", from_bytes=False)


def test_cli_turns_an_unforeseen_exception_into_one_line(pkg, monkeypatch):
    """The last line of defence: any exception that is not p2u's own (a bug, an input nobody
    foresaw) is still one line and exit code 1 on the command line, never a traceback."""
    from click.testing import CliRunner

    import p2u_onnx.api as api_mod
    from p2u_onnx.cli import main

    def boom(*a, **k):
        raise KeyError("line one\nline two")
    monkeypatch.setattr(api_mod, "inspect", boom)
    r = CliRunner().invoke(main, ["inspect", str(pkg)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.count("\n") == 1 and r.output.startswith("Error: internal error (KeyError"), \
        r.output
    # click's own usage errors are untouched (exit code 2)
    r = CliRunner().invoke(main, ["restore", str(pkg)])
    assert r.exit_code == 2, r.output


def test_onnxruntime_messages_with_newlines_stay_one_line(pkg):
    """onnxruntime's messages quote node and tensor names, which the package chooses: a node
    named with newlines in a skeleton onnxruntime refuses."""
    g = _graph_of(pkg)
    g.graph.node[-1].op_type, g.graph.node[-1].domain = "NoSuchOp", "com.example"
    g.graph.node[-1].name = "evil\nError: forged line\nagain"
    g.opset_import.add(domain="com.example", version=1)
    _new_graph(pkg, g.SerializeToString())
    refused(lambda: api.verify(pkg))
    session_refuses(pkg)
    with ProgressiveSession(pkg, verify=False) as s:
        refused(lambda: s.apply(pkg / "stage-1.p2u"))
        assert s.stage == 0
    m = base_model(pkg)
    m.graph.node[-1].op_type, m.graph.node[-1].domain = "NoSuchOp", "com.example"
    m.graph.node[-1].name = "evil\nError: forged line"
    m.opset_import.add(domain="com.example", version=1)
    rebind(pkg, m.SerializeToString())
    refused(lambda: api.verify(pkg))
    refused(lambda: ProgressiveSession(pkg))
    cli_one_line(run_cli("verify", str(pkg)))
    cli_one_line(run_cli("run", str(pkg)))


@pytest.fixture
def synth_pkg(tmp_path, monkeypatch) -> Path:
    """A package of a model with an int64 input whose probe inputs are synthesized on the
    device (``probe.synth``: outside the binding, like the whole probe entry)."""
    import p2u_onnx
    import p2u_onnx.probe as probe_mod
    from synth import _model, vi, weight

    monkeypatch.setattr(probe_mod, "MAX_STORED_INPUT_BYTES", 0)
    monkeypatch.setattr(probe_mod, "STORED_SYNTH_INPUT_BYTES", 0)
    table = onnx.numpy_helper.from_array(weight((512, 64)), "E")
    model = _model([helper.make_node("Gather", ["E", "ids"], ["y"])],
                   [vi("ids", TensorProto.INT64, ("N", 8))],
                   [vi("y", TensorProto.FLOAT, ("N", 8, 64))], [table])
    (tmp_path / "root").mkdir()
    p = tmp_path / "root" / "ids.p2u"
    p2u_onnx.encode(model, p, "4,8,lossless")
    assert manifest(p)["probe"]["inputs_stored"] is False
    return p


@pytest.mark.parametrize("spec", [
    {"ids": {"fill": 2 ** 70}}, {"ids": {"fill": -2 ** 70}}, {"ids": {"fill": 1e300}},
    {"ids": {"fill": float("nan")}}, {"ids": {"high": 2 ** 70}}, {"ids": {"shape": [2 ** 62]}},
    {"ids": {"shape": [1 << 13, 1 << 13]}}, {"ids": {"shape": "8"}}, {"ids": []}, [],
    {"ids": {"fill": "7"}}])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's cast warnings reach stderr
def test_probe_synth_spec_attacks(synth_pkg, spec):
    """probe.synth is outside the binding: a fill of 2**70 for an int64 input was an
    OverflowError out of verify (and 1e300 a numpy warning on stderr)."""
    m = manifest(synth_pkg)
    m["probe"]["synth"] = spec
    write_manifest(synth_pkg, m)
    reseal(synth_pkg)
    for fn in (lambda: api.verify(synth_pkg), lambda: ProgressiveSession(synth_pkg)):
        try:
            with_session = fn()
            if isinstance(with_session, ProgressiveSession):
                with_session.close()
        except P2UError as e:
            one_line(e)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_the_unbound_probe_entry(built, tmp_path_factory, data):
    """The probe entry is outside the binding: any change to it (resealed) is one line or a
    session that serves its stages; never another exception."""
    from test_format_attacks import _mutate

    p = tmp_path_factory.mktemp("pf") / "m.p2u"
    shutil.copytree(built["probe"], p)
    m = manifest(p)
    m["probe"] = _mutate({"probe": m["probe"]}, data).get("probe") \
        if data.draw(st.booleans()) else _mutate(m["probe"], data)
    write_manifest(p, m)  # (the files are unchanged: every listed sha256 still matches)
    for fn in (lambda: api.verify(p), lambda: _evaluate(p)):
        try:
            fn()
        except P2UError as e:
            one_line(e)
    try:
        with ProgressiveSession(p) as s:
            s.upgrade(background=False)
    except P2UError as e:
        one_line(e)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_the_unbound_stage_table(built, tmp_path_factory, data):
    """The stage table is outside the binding too: mutated, it gives one line or the
    untouched package's weights through restore, open_stages and a session."""
    from test_format_attacks import _mutate

    p = tmp_path_factory.mktemp("sf") / "m.p2u"
    shutil.copytree(built["noprobe"], p)
    m = manifest(p)
    m["stages"] = _mutate({"s": m["stages"]}, data).get("s")
    write_manifest(p, m)
    for fn in (lambda: api.restore(p, p.parent / "o.onnx"), lambda: api.open_stages(p),
               lambda: api.inspect(p, tensors=True)):
        try:
            fn()
        except P2UError as e:
            one_line(e)
    try:
        with ProgressiveSession(p) as s:
            s.upgrade(background=False)
    except P2UError as e:
        one_line(e)


def test_many_tensors_of_one_name_cannot_make_the_base_check_quadratic(pkg):
    """20000 manifest tensors that all name the same graph tensor, and as many base.onnx
    initializers of that one name, each at its own span: the base check ran in O(n**2)
    (minutes), before any stage file (and so before the binding) is read."""
    n = 20000
    m = manifest(pkg)
    base = base_model(pkg)
    size = m["base_model"]["files"][1]["size"]
    t0 = {"name": "", "tensor": "T", "kind": "initializer", "dtype": "float32", "shape": [1],
          "layout": {"mode": "tensor", "axis": 0, "block_size": 0}, "bits": 8,
          "symmetric": True, "base": {"code_type": 3, "zero_point": None}}
    tensors = []
    for i in range(n):
        off = size + 8 * i
        tensors.append({**t0, "name": f"t{i}", "weights": [i * 64, 4],
                        "base": {**t0["base"], "codes": [off, 1], "scale": [off + 4, 4]}})
        for suffix, dtype, dims, o, length in (("q", 3, [1], off, 1), ("s", 1, [], off + 4, 4)):
            t = TensorProto(name=f"T__p2u_{suffix}", data_type=dtype, dims=dims)
            for k, v in (("location", "base.bin"), ("offset", str(o)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
            base.graph.initializer.append(t)
    m["tensors"] = tensors
    with open(pkg / "base.bin", "ab") as f:
        f.write(bytes(8 * n))
    (pkg / "base.onnx").write_bytes(base.SerializeToString())
    write_manifest(pkg, m)
    reseal(pkg)
    out = _rlimited(f"""
        import time
        from p2u_onnx.external import check_base_graph
        from p2u_onnx.format import load_manifest
        from p2u_onnx.errors import P2UError
        m = load_manifest({str(pkg)!r})
        t = time.perf_counter()
        try:
            check_base_graph({str(pkg / 'base.onnx')!r}, m, m["base_model"]["files"][1]["size"])
            print("CHECKED", time.perf_counter() - t)
        except P2UError as e:
            print("REFUSED", time.perf_counter() - t, e)
    """, limit=2 << 30, timeout=120)
    assert float(out.split()[1]) < 10, out
    session_refuses(pkg)


def test_many_empty_tensors_at_one_span(pkg):
    """The same trick with empty tensors (shape [0]: empty spans never overlap, so thousands
    can sit at one offset): refused in linear time."""
    n = 20000
    m = manifest(pkg)
    base = base_model(pkg)
    size = m["base_model"]["files"][1]["size"]
    t0 = {"tensor": "T", "kind": "initializer", "dtype": "float32", "shape": [0],
          "layout": {"mode": "channel", "axis": 0, "block_size": 0}, "bits": 8,
          "symmetric": True, "weights": [0, 0],
          "base": {"code_type": 3, "zero_point": None, "codes": [size, 0], "scale": [size, 0]}}
    m["tensors"] = m["tensors"] + [{**t0, "name": f"t{i}"} for i in range(n)]
    for i in range(n):
        for suffix, dtype, dims in (("q", 3, [0]), ("s", 1, [0])):
            t = TensorProto(name=f"T__p2u_{suffix}", data_type=dtype, dims=dims)
            for k, v in (("location", "base.bin"), ("offset", str(size)), ("length", "0")):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
            base.graph.initializer.append(t)
    (pkg / "base.onnx").write_bytes(base.SerializeToString())
    write_manifest(pkg, m)
    reseal(pkg)
    out = _rlimited(f"""
        import time
        from p2u_onnx.external import check_base_graph
        from p2u_onnx.format import load_manifest
        from p2u_onnx.errors import P2UError
        m = load_manifest({str(pkg)!r})
        t = time.perf_counter()
        try:
            check_base_graph({str(pkg / 'base.onnx')!r}, m, m["base_model"]["files"][1]["size"])
            print("CHECKED", time.perf_counter() - t)
        except P2UError as e:
            print("REFUSED", time.perf_counter() - t, e)
    """, limit=2 << 30, timeout=120)
    assert out.startswith("REFUSED") and float(out.split()[1]) < 10, out
    assert "given twice" in out, out


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_a_runtime_failure_with_a_multi_line_message_is_one_line(pkg, monkeypatch, strategy):
    """onnxruntime's messages quote what the package holds and may span lines: a live
    session's upgrade error is still one line, and the session keeps serving stage 0."""
    import onnxruntime as ort

    with ProgressiveSession(pkg, verify=False, strategy=strategy) as s:
        def broken(*a, **k):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : node\nError: forged\nline")
        monkeypatch.setattr(ort, "InferenceSession", broken)
        msg = refused(lambda: s.apply(pkg / "stage-1.p2u"))
        assert "forged" in msg and s.stage == 0
        monkeypatch.undo()
        assert s.apply(pkg / "stage-1.p2u") == 1


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_hostile_stages_through_each_strategy(pkg, strategy):
    """Shift and kind attacks through both ways of patching a live session."""
    _stage_header_attack(pkg, 2, lambda h: _refines(h)[0].__setitem__("shift", 0))
    with ProgressiveSession(pkg, verify=False, strategy=strategy) as s:
        assert s.apply(pkg / "stage-1.p2u") == 1
        refused(lambda: s.apply(pkg / "stage-2.p2u"), FormatError, "shift")
        assert s.stage == 1


def _padding_bomb(p: Path, n: int, block: int = 1 << 16) -> None:
    """The full attacker: ``n`` coded tensors of one value each, in blocks of ``block``
    values (each block is decoded and held whole: ``block`` values of memory for 8 bytes of
    base.bin), with base.onnx, the skeleton and both stage files to match, rebound."""
    from p2u_onnx.codecs import IntPlanesCodec

    m = manifest(p)
    base = base_model(p)
    graph = _graph_of(p)
    size = m["base_model"]["files"][1]["size"]
    wend = max(sum(t["weights"]) for t in m["tensors"])

    def ext(name, dtype, dims, loc, off, length):
        t = TensorProto(name=name, data_type=dtype, dims=dims)
        for k, v in (("location", loc), ("offset", str(off)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        t.data_location = TensorProto.EXTERNAL
        return t

    for i in range(n):
        off = size + 8 * i
        m["tensors"].append({
            "name": f"P{i}", "tensor": f"P{i}", "kind": "initializer", "dtype": "float32",
            "shape": [1], "layout": {"mode": "block", "axis": 0, "block_size": block},
            "bits": 8, "symmetric": True, "weights": [wend + 4 * i, 4],
            "base": {"code_type": 3, "zero_point": None, "codes": [off, 1],
                     "scale": [off + 4, 4]}})
        base.graph.initializer.extend([ext(f"P{i}__p2u_q", 3, [1], "base.bin", off, 1),
                                       ext(f"P{i}__p2u_s", 1, [1], "base.bin", off + 4, 4)])
        graph.graph.initializer.append(ext(f"P{i}", 1, [1], "weights.bin", wend + 4 * i, 4))
    with open(p / "base.bin", "ab") as f:
        f.write(bytes(8 * n))
    (p / "base.onnx").write_bytes(base.SerializeToString())
    write_manifest(p, m)
    zeros = IntPlanesCodec().encode(np.zeros(block, np.int64))
    raw = graph.SerializeToString()

    def change(header, parts):
        out = [(e, d) for e, d in parts if e["kind"] != "file"]
        out += [({"kind": "refine", "name": f"P{i}", "blocks": [0, 1], "shift": 4,
                  "codec": {"id": "int-planes", "level": 3}}, zeros) for i in range(n)]
        return out + [({"kind": "file", "name": "graph.onnx", "codec": {"id": "zstd"},
                        "raw_length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
                       ZstdCodec(level=1).encode(raw))]
    restage(p, 1, change)
    rebind(p)


def test_padding_cannot_multiply_memory(pkg):
    """4000 one-value tensors in blocks of 65536: 8 bytes of base.bin each, 256 KB of
    decoded blocks each (1 GB held by restore). Refused, or bounded, in 1 GiB."""
    _padding_bomb(pkg, 4000)
    out = _rlimited(f"""
        from p2u_onnx import api
        from p2u_onnx.errors import P2UError
        try:
            api.restore({str(pkg)!r}, {str(pkg.parent / 'o.onnx')!r}, 1)
            print("ACCEPTED")
        except P2UError as e:
            print("REFUSED", e)
    """, limit=1 << 30, timeout=300)
    assert out.startswith("REFUSED") and "padding" in out, out


def test_eval_reads_the_probe_as_every_reader_does(ppkg, tmp_path):
    """p2u eval took the probe's inputs by its own path: through a symbolic link (a file
    outside the folder) and blocking forever on a FIFO."""
    secret = tmp_path / "secret.npz"
    shutil.move(ppkg / "probe.npz", secret)
    os.symlink(secret, ppkg / "probe.npz")
    refused(lambda: _evaluate_probe(ppkg), P2UError, "symbolic link")
    os.unlink(ppkg / "probe.npz")
    os.mkfifo(ppkg / "probe.npz")
    out = _rlimited(f"""
        from p2u_onnx.evaluation import evaluate
        from p2u_onnx.errors import P2UError
        try:
            evaluate({str(ppkg)!r}, repeats=1)
            print("ACCEPTED")
        except P2UError as e:
            print("REFUSED", e)
    """, timeout=60)
    assert out.startswith("REFUSED") and "not a regular file" in out, out


def _evaluate_probe(p: Path):
    from p2u_onnx.evaluation import evaluate

    return evaluate(p, repeats=1)


def test_a_workdir_that_leads_into_the_package_is_refused(built, tmp_path):
    p = tmp_path / "root" / "m.p2u"
    shutil.copytree(built["noprobe"], p)
    os.symlink(p, tmp_path / "alias")
    before = snapshot(tmp_path / "root")
    for work in (p / "work", tmp_path / "alias" / "w", tmp_path / "alias"):
        refused(lambda: ProgressiveSession(p, workdir=work), P2UError, "inside the package")
    assert snapshot(tmp_path / "root") == before


def test_a_read_only_package_of_stage_files_only(built, tmp_path):
    """No base.onnx or base.bin in the folder: the session unpacks stage 0 into its own work
    folder, never into the package (which is read-only here)."""
    p = tmp_path / "root" / "m.p2u"
    shutil.copytree(built["probe"], p)
    (p / "base.onnx").unlink()
    (p / "base.bin").unlink()
    for f in p.iterdir():
        os.chmod(f, 0o444)
    os.chmod(p, 0o555)
    try:
        before = snapshot(tmp_path / "root")
        with ProgressiveSession(p) as s:
            assert s.upgrade(background=False) == 2
        with ProgressiveSession(p, workdir=tmp_path / "work") as s:
            assert s.upgrade(background=False) == 2
        assert snapshot(tmp_path / "root") == before
        assert not [x for x in (tmp_path / "work").iterdir() if x.name.startswith("session-")]
    finally:
        os.chmod(p, 0o755)


def test_run_and_eval_with_a_huge_declared_input(pkg, tmp_path):
    """A (rebound) base.onnx and skeleton whose input is declared [10000000, 64]: p2u run
    and p2u eval --synth synthesize inputs from it: refused in one line, no allocation."""
    m = base_model(pkg)
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (10**7, 64)):
        d.Clear()
        d.dim_value = v
    g = _graph_of(pkg)
    for d, v in zip(g.graph.input[0].type.tensor_type.shape.dim, (10**7, 64)):
        d.Clear()
        d.dim_value = v
    _new_graph(pkg, g.SerializeToString())
    rebind(pkg, m.SerializeToString())
    for args in (["run", str(pkg)], ["eval", str(pkg), "--synth"]):
        out = cli_one_line(run_cli(*args))
        assert "internal error" not in out and ("MiB" in out or "bad shape" in out), out


@pytest.mark.parametrize("change", [
    lambda m: m.__setitem__("tensors", None), lambda m: m.pop("stages"),
    lambda m: m["tensors"][0].__setitem__("shape", [1 << 30, 1 << 30]),
    lambda m: m["base_model"]["files"][0].__setitem__("path", "../x")])
def test_bytes_source_with_a_manifest_dict_is_validated(pkg, change):
    """BytesSource also takes the manifest as a dict (parsed by the caller): it is checked
    like the bytes are."""
    m = manifest(pkg)
    change(m)
    refused(lambda: ProgressiveSession(BytesSource(m, (pkg / "stage-0.p2u").read_bytes())),
            FormatError, "manifest (dict)")


def _ext(name, location="base.bin", offset="0", length="16", dtype=1, dims=(4,)):
    t = TensorProto(name=name, data_type=dtype, dims=list(dims))
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            t.external_data.add(key=k, value=v)
    t.data_location = TensorProto.EXTERNAL
    return t


SKELETON_ATTACKS = {
    "sparse initializer out of the folder": lambda g: g.graph.sparse_initializer.append(
        onnx.SparseTensorProto(values=_ext("sv", "../secret.bin"),
                               indices=_ext("si", dtype=7, length="8", dims=(1,)),
                               dims=[16])),
    "constant node in a function": lambda g: g.functions.append(helper.make_function(
        "evil", "F", [], ["z"], [helper.make_node("Constant", [], ["z"],
                                                  value=_ext("fz", "/etc/passwd"))],
        [helper.make_opsetid("", 17)])),
    "offset with an underscore": lambda g: g.graph.initializer.append(
        _ext("u", offset="1_0")),
    "negative length": lambda g: g.graph.initializer.append(_ext("n", length="-16")),
    "huge offset": lambda g: g.graph.initializer.append(_ext("h", offset=str(1 << 62))),
    "no length": lambda g: g.graph.initializer.append(_ext("nl", length=None)),
    "weights.bin at no tensor's span": lambda g: g.graph.initializer.append(
        _ext("w", "weights.bin", "1", "16")),
    "overlapping base.bin spans": lambda g: g.graph.initializer.extend(
        [_ext("o1", offset="0", length="16"), _ext("o2", offset="8", length="16")]),
    "training graph": lambda g: g.training_info.append(onnx.TrainingInfoProto(
        initialization=helper.make_graph([], "t", [], [], initializer=[
            _ext("tr", "../../x")]))),
}


@pytest.mark.parametrize("what", list(SKELETON_ATTACKS))
def test_skeleton_external_data_attacks(pkg, what):
    g = _graph_of(pkg)
    SKELETON_ATTACKS[what](g)
    _new_graph(pkg, g.SerializeToString())
    before = snapshot(pkg.parent)
    refused(lambda: api.verify(pkg), FormatError, "graph.onnx")
    refused(lambda: api.restore(pkg, pkg.parent / "o.onnx"), FormatError, "graph.onnx")
    session_refuses(pkg, "graph.onnx")
    assert snapshot(pkg.parent) == before


def _special(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()


@pytest.mark.parametrize("kind", ["device", "socket"])
@pytest.mark.parametrize("name", ["manifest.json", "base.bin", "base.onnx", "stage-1.p2u",
                                  "probe.npz"])
def test_devices_and_sockets_in_the_package(ppkg, kind, name):
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    _special(ppkg / name, kind)
    out = _rlimited(f"""
        from p2u_onnx import api
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.evaluation import evaluate
        from p2u_onnx.errors import P2UError
        p = {str(ppkg)!r}

        def session():
            with ProgressiveSession(p) as s:
                s.upgrade(background=False)
        for fn in (lambda: api.inspect(p), lambda: api.verify(p),
                   lambda: api.restore(p, p + "-out.onnx"), session,
                   lambda: evaluate(p, repeats=1)):
            try:
                fn()
                print("ACCEPTED")
            except P2UError as e:
                assert "\\n" not in str(e)
                print("REFUSED", e)
    """, timeout=120)
    lines = out.splitlines()
    assert len(lines) == 5, out
    # verify and the session refuse; inspect only reads the manifest; restore needs no probe
    assert lines[1].startswith("REFUSED") and lines[3].startswith("REFUSED"), out


def test_refused_sessions_leave_no_work_folder(pkg, tmp_path):
    """Sessions refused at every point (manifest, base, probe, stage 1, stage 2) and
    sessions closed normally: none of this process's work folders is left in the system's
    temporary folder or in a given workdir."""
    bad = {}
    for case in ("tensor entry empty", "base.onnx garbage", "graph.onnx unknown op",
                 "stage 1 truncated"):
        q = tmp_path / case.replace(" ", "_") / "m.p2u"
        shutil.copytree(pkg, q)
        MALFORMED[case](q)
        bad[case] = q
    out = _rlimited(f"""
        import os, tempfile
        from pathlib import Path
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.errors import P2UError
        work = Path({str(tmp_path / 'work')!r})
        for p in {[str(q) for q in bad.values()] + [str(pkg)]!r}:
            for wd in (None, work):
                try:
                    with ProgressiveSession(p, verify=False, workdir=wd) as s:
                        s.upgrade(background=False)
                    print("SERVED", p)
                except P2UError as e:
                    print("REFUSED", e)
        mine = f"p2u-{{os.getpid()}}-"
        left = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(mine)]
        left += [n for n in os.listdir(work) if n.startswith("session-")] if work.exists() else []
        print("LEFT", left)
    """, timeout=180)
    assert out.count("REFUSED") == 8 and out.count("SERVED") == 2, out
    assert "LEFT []" in out, out


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_stage_headers_resealed_through_every_reader(built, tmp_path_factory, data):
    """A stage header mutated (structure-aware) and the manifest's stage table resealed:
    restore, open_stages and a live session give one line or the untouched weights."""
    from test_format_attacks import _mutate, _with_header

    p = tmp_path_factory.mktemp("hf") / "m.p2u"
    shutil.copytree(built["noprobe"], p)
    k = data.draw(st.sampled_from([0, 1, 2]))
    raw = (p / f"stage-{k}.p2u").read_bytes()
    header = _mutate(read_stage(raw).header, data)
    (p / f"stage-{k}.p2u").write_bytes(_with_header(raw, header))
    reseal(p)
    for fn in (lambda: api.restore(p, p.parent / "o.onnx"), lambda: api.open_stages(p),
               lambda: api.verify(p)):
        try:
            fn()
        except P2UError as e:
            one_line(e)
    try:
        src = BytesSource((p / "manifest.json").read_bytes(), (p / "stage-0.p2u").read_bytes(),
                          fetch=lambda j: (p / f"stage-{j}.p2u").read_bytes())
        with ProgressiveSession(src, verify=False) as s:
            s.upgrade(background=False)
    except P2UError as e:
        one_line(e)

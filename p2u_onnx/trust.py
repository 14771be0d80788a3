"""Authenticity and freshness of a package: pins, signatures, versions (device side).

A package stays a directory of plain static files; these checks add one optional file,
``manifest.json.sig``, and need nothing from the server. ``manifest.json`` lists the size and
sha256 of every other file of the package, so whatever vouches for the manifest's bytes vouches
for the whole package.

Pin (``expect="sha256:<hex>"``)
    The exact bytes of ``manifest.json`` must hash to ``<hex>``. Checked before the manifest is
    parsed, and before anything is read, written or cached because of it.
Signature (``trust=``)
    ``manifest.json.sig`` beside the manifest is a TUF-like envelope::

        {"signed": {"_type": "p2u-manifest-signature", "spec_version": 1,
                    "manifest_sha256": "<hex>", "name": "<model name>", "version": <int>,
                    "expires": "2027-01-05T16:00:00Z" or null},
         "signatures": [{"keyid": "<hex sha256 of the raw public key>", "sig": "<hex>"}]}

    Each ``sig`` is an Ed25519 signature over the canonical JSON of ``"signed"`` (sorted keys, no
    spaces, ASCII). ``trust`` is a public key (``ed25519:<base64 of the 32 raw bytes>``), a file
    holding such lines (``p2u keygen`` writes ``KEY.pub``), or a list of them; one valid signature
    by one of them is needed. Refused: no signature file, a signature by no trusted key, a bad
    signature, a manifest whose sha256, name or version differ from what was signed, and an
    expired signature (a mirror replaying an old package forever: a "freeze"; there is no option
    to accept an expired signature, the publisher re-signs instead). Verifying needs the
    ``cryptography`` package (``pip install 'p2u-onnx[sign]'``), imported only then.
Versions (rollback)
    A manifest names its model (``"name"``) and a ``"version"`` integer that rises with each
    release (``p2u encode --name --version``; default: ``$SOURCE_DATE_EPOCH``, else the encode
    time in seconds). A state
    file remembers, per model name, the version last accepted and the digest of its manifest
    (sha256 of its canonical JSON); an older version is refused (rollback), and so is the same
    version with other content (mix-and-match), unless ``allow_rollback=True``, which accepts
    the package and makes it the remembered version. The state lives in ``$P2U_STATE_DIR``, else
    ``$XDG_STATE_HOME/p2u``, else ``~/.local/state/p2u`` (``versions.json``). Live sessions
    (:class:`~p2u_onnx.runtime.ProgressiveSession`) and HTTP sources (:func:`~p2u_onnx.transport
    .fetch`) check and record it; ``verify``, ``restore`` and ``inspect`` of a local folder do
    neither. Without ``trust=`` the version check catches stale mirrors and mistakes, not an
    attacker, who can write any version into a manifest he serves.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError, P2UError, TrustError
from .format import MANIFEST_NAME, atomic_write_bytes, open_regular, parse_manifest, \
    read_manifest_bytes

try:  # POSIX: one writer of the state file at a time
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SIGNATURE_NAME",
    "Policy",
    "VersionState",
    "generate_key",
    "load_trusted_keys",
    "manifest_sha256",
    "package_identity",
    "parse_expiry",
    "parse_pin",
    "read_manifest_bytes",
    "read_signature",
    "sign_package",
    "state_dir",
]

SIGNATURE_NAME = "manifest.json.sig"
SIGNATURE_TYPE = "p2u-manifest-signature"
SPEC_VERSION = 1
KEY_PREFIX = "ed25519:"
MAX_MANIFEST = 64 << 20
MAX_SIGNATURE = 64 << 10
MAX_KEY_FILE = 64 << 10
MAX_VERSION = 2**63 - 1
STATE_NAME = "versions.json"
_PIN = re.compile(r"sha256:([0-9a-fA-F]{64})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_EXPIRY = re.compile(r"(\d{1,6})\s*([mhdw])")
# control characters (C0, DEL, C1: terminal escapes) and lone surrogates (not encodable)
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

TrustSpec = str | os.PathLike | Iterable[str | os.PathLike]
"""What ``trust=`` takes: a public key string, a ``.pub`` file, or a list of them."""


# ---------------------------------------------------------------- small pieces


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def manifest_sha256(raw: bytes) -> str:
    """Hex sha256 of the exact bytes of a ``manifest.json`` (what ``expect=`` pins)."""
    return hashlib.sha256(raw).hexdigest()


def parse_pin(expect: str) -> str:
    """The hex digest of a pin ``"sha256:<64 hex digits>"``, else :class:`P2UError`."""
    m = _PIN.fullmatch(expect.strip()) if isinstance(expect, str) else None
    if m is None:
        shown = expect if isinstance(expect, str) and len(expect) < 90 else type(expect).__name__
        msg = f"a pin is 'sha256:' and the 64 hex digits of manifest.json's sha256, not {shown!r}"
        raise P2UError(f"expect: {msg}", cli=f"--expect: {msg}")
    return m.group(1).lower()


def package_identity(manifest: Mapping[str, Any], where: str = MANIFEST_NAME
                     ) -> tuple[str, int] | None:
    """``(name, version)`` of a manifest, or None for a package made before packages carried
    them (no version check is possible then). Malformed values: :class:`FormatError`."""
    name, version = manifest.get("name"), manifest.get("version")
    if name is None and version is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or _NAME_BAD.search(name):
        raise FormatError(f"{where}: 'name' must be a string of 1 to 200 printable characters")
    if isinstance(version, bool) or not isinstance(version, int) \
            or not 0 <= version <= MAX_VERSION:
        raise FormatError(f"{where}: 'version' must be an integer from 0 to 2**63-1")
    return name, version


def _identity_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON: the same for its bytes and its parsed dict."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    """Bytes of the regular file ``path``, at most ``cap`` (else :class:`FormatError`)."""
    with open_regular(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise FormatError(f"{path}: {what} larger than {cap} bytes (refused)")
    return data


def read_signature(package: str | os.PathLike) -> bytes | None:
    """The bytes of ``package/manifest.json.sig``, or None when there is none."""
    path = Path(package) / SIGNATURE_NAME
    try:
        return _read_capped(path, MAX_SIGNATURE, "signature file")
    except FileNotFoundError:
        return None
    except FormatError as e:  # too large, a symlink, not a regular file
        raise TrustError(f"not a valid signature file: {e}") from e
    except OSError as e:
        raise TrustError(f"cannot read {path}: {e.strerror or e}") from e


def _crypto():
    """The ``cryptography`` Ed25519 module, or a :class:`P2UError` naming the extra."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise P2UError("signing and checking signatures need the cryptography package: "
                       "pip install 'p2u-onnx[sign]'") from e
    return ed25519


# ---------------------------------------------------------------- keys


def _keyid(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _public_string(raw: bytes) -> str:
    return KEY_PREFIX + base64.b64encode(raw).decode()


def _parse_public(text: str, where: str) -> bytes:
    body = text.strip()
    if body.startswith("-----BEGIN"):
        raise P2UError(f"{where}: a private key; trust the public key (KEY.pub) instead")
    if not body.startswith(KEY_PREFIX):
        raise P2UError(f"{where}: not a public key (expected '{KEY_PREFIX}' and the base64 of "
                       "32 bytes, as p2u keygen writes in KEY.pub)")
    try:
        raw = base64.b64decode(body[len(KEY_PREFIX):], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise P2UError(f"{where}: not a valid Ed25519 public key (the base64 must hold 32 bytes)")
    return raw


def load_trusted_keys(trust: TrustSpec) -> dict[str, bytes]:
    """``{keyid: raw public key}`` from a key string, a ``.pub`` file (one key per line, ``#``
    comments) or a list of them. A bad key or file is a :class:`P2UError` naming it."""
    if isinstance(trust, (str, os.PathLike)):
        items = [trust]
    elif isinstance(trust, Iterable) and not isinstance(trust, (bytes, bytearray, Mapping)):
        items = list(trust)
    else:
        raise P2UError(f"trust: expected a public key string, a .pub file or a list of them, "
                       f"not {type(trust).__name__}")
    keys: dict[str, bytes] = {}
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise P2UError("trust: an empty string is neither a public key nor a .pub file")
        if isinstance(item, str) and item.strip().startswith(KEY_PREFIX):
            raws = [_parse_public(item, "trust key")]
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            try:
                text = _read_capped(path, MAX_KEY_FILE, "key file").decode("utf-8")
            except FileNotFoundError:
                raise P2UError(f"{path}: no such public key file") from None
            except (OSError, UnicodeDecodeError) as e:
                raise P2UError(f"{path}: cannot read the public key file "
                               f"({getattr(e, 'strerror', None) or e})") from e
            lines = [ln for ln in (s.strip() for s in text.splitlines())
                     if ln and not ln.startswith("#")]
            if not lines:
                raise P2UError(f"{path}: holds no public key")
            raws = [_parse_public(ln, str(path)) for ln in lines]
        else:
            raise P2UError(f"trust: expected a public key string or a .pub file, not "
                           f"{type(item).__name__}")
        keys.update((_keyid(r), r) for r in raws)
    if not keys:
        raise P2UError("trust: no public key given")
    return keys


def generate_key(path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 private key to ``path`` (PKCS#8 PEM, mode 0600) and its public key
    to ``path.pub`` (one line); returns the public key string. Encoder side: needs the
    ``sign`` extra (cryptography)."""
    ed = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if not overwrite:
        for p in (path, pub_path):
            if p.exists() or p.is_symlink():
                raise P2UError(f"{p} already exists (use overwrite=True)",
                               cli=f"{p} already exists (use --force)")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    raw = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    public = _public_string(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        if overwrite:
            os.replace(tmp, path)
        else:  # never replaces a key that appeared meanwhile
            os.link(tmp, path)
            os.unlink(tmp)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise P2UError(f"{path} already exists (use overwrite=True)",
                       cli=f"{path} already exists (use --force)") from None
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise P2UError(f"cannot write {path}: {e.strerror or e}") from e
    atomic_write_bytes(pub_path, (public + "\n").encode())
    return public


def _load_private(path: str | os.PathLike):
    ed = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    path = Path(path)
    try:
        data = _read_capped(path, MAX_KEY_FILE, "key file")
    except FileNotFoundError:
        raise P2UError(f"{path}: no such private key file") from None
    except OSError as e:
        raise P2UError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        hint = " (this is the public key: sign with the private one)" \
            if data.strip().startswith(KEY_PREFIX.encode()) else ""
        raise P2UError(f"{path}: not an unencrypted PEM private key{hint}") from e
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise P2UError(f"{path}: not an Ed25519 key (p2u keygen makes one)")
    return key


# ---------------------------------------------------------------- signing


def parse_expiry(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"2w"`` from ``now``, an ISO date or time (UTC unless it
    says otherwise), or ``"never"`` / None (no expiry)."""
    if text is None or text.strip().lower() in ("", "never", "none"):
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    m = _EXPIRY.fullmatch(text.strip().lower())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now + dt.timedelta(**{{"m": "minutes", "h": "hours", "d": "days",
                                      "w": "weeks"}[unit]: n})
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise P2UError(f"expires: {text!r} is not a duration (30d, 12h, 2w), an ISO date or "
                       "'never'") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_package(package: str | os.PathLike, keys: str | os.PathLike | Iterable[str | os.PathLike],
                 expires: dt.datetime | str | None = None) -> tuple[Path, dict[str, Any]]:
    """Sign ``package`` with the private key file(s) ``keys``: writes
    ``package/manifest.json.sig`` atomically; returns its path and its ``"signed"`` part.

    ``expires``: a datetime, a string for :func:`parse_expiry`, or None (never). A package
    without a name and version (made before they existed) cannot be signed: re-encode it.
    """
    package = Path(package)
    raw = read_manifest_bytes(package)
    manifest = parse_manifest(raw, str(package / MANIFEST_NAME))
    ident = package_identity(manifest, str(package / MANIFEST_NAME))
    if ident is None:
        raise P2UError(f"{package}: the manifest has no name and version (made by an older "
                       "p2u): encode it again to sign it")
    if isinstance(expires, str):
        expires = parse_expiry(expires)
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.timezone.utc)
    if expires is not None and expires <= dt.datetime.now(dt.timezone.utc):
        raise P2UError(f"expires: {_iso(expires)} is already past")
    signed = {"_type": SIGNATURE_TYPE, "spec_version": SPEC_VERSION,
              "manifest_sha256": manifest_sha256(raw), "name": ident[0], "version": ident[1],
              "expires": None if expires is None else _iso(expires)}
    from cryptography.hazmat.primitives import serialization as ser

    message = _canonical(signed)
    sigs = []
    for k in [keys] if isinstance(keys, (str, os.PathLike)) else list(keys):
        key = _load_private(k)
        pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        sigs.append({"keyid": _keyid(pub), "sig": key.sign(message).hex()})
    if not sigs:
        raise P2UError("sign: no private key given")
    out = package / SIGNATURE_NAME
    atomic_write_bytes(out, json.dumps({"signed": signed, "signatures": sigs}, indent=1,
                                       sort_keys=True).encode() + b"\n")
    return out, signed


# ---------------------------------------------------------------- checking


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _parse_envelope(data: bytes, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    bad = f"{where}: not a valid signature file"
    if len(data) > MAX_SIGNATURE:
        raise TrustError(f"{bad} (larger than {MAX_SIGNATURE} bytes)")
    try:
        env = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise TrustError(f"{bad} ({str(e)[:80]})") from None
    signed = env.get("signed") if isinstance(env, dict) else None
    sigs = env.get("signatures") if isinstance(env, dict) else None
    if not isinstance(signed, dict) or not isinstance(sigs, list) or not sigs \
            or not all(isinstance(s, dict) and isinstance(s.get("keyid"), str)
                       and isinstance(s.get("sig"), str) for s in sigs):
        raise TrustError(f"{bad} (expected 'signed' and a list of 'signatures' with "
                         "'keyid' and 'sig')")
    return signed, sigs


def _check_signed_fields(signed: dict[str, Any], where: str) -> None:
    bad = f"{where}: signed content is malformed"
    if signed.get("_type") != SIGNATURE_TYPE or signed.get("spec_version") != SPEC_VERSION:
        raise TrustError(f"{bad} (not a p2u manifest signature of spec version {SPEC_VERSION})")
    if not isinstance(signed.get("manifest_sha256"), str) \
            or not _HEX64.fullmatch(signed["manifest_sha256"]):
        raise TrustError(f"{bad} (manifest_sha256)")
    if signed.get("expires") is not None and not isinstance(signed["expires"], str):
        raise TrustError(f"{bad} (expires)")
    # exact types: 2.0 == 2 and True == 1 in Python, so a float or a bool would compare equal
    # to the manifest's integer version
    if type(signed.get("name")) is not str or type(signed.get("version")) is not int:
        raise TrustError(f"{bad} (name must be a string and version an integer)")


def check_signature(signature: bytes | None, raw: bytes, manifest: Mapping[str, Any],
                    keys: Mapping[str, bytes], where: str,
                    now: dt.datetime | None = None) -> dict[str, Any]:
    """Check ``signature`` (the bytes of ``manifest.json.sig``) against the manifest's bytes
    ``raw`` and parsed ``manifest``; returns the signed part. :class:`TrustError` on refusal."""
    if signature is None:
        raise TrustError(f"{where}: the package is not signed (no {SIGNATURE_NAME}) and "
                         "trust= asks for a signature",
                         cli=f"{where}: the package is not signed (no {SIGNATURE_NAME}) and "
                             "--trust asks for a signature")
    signed, sigs = _parse_envelope(signature, where)
    ed = _crypto()
    from cryptography.exceptions import InvalidSignature

    message = _canonical(signed) if _canonical_ok(signed) else None
    known = [s for s in sigs if s["keyid"] in keys]
    if not known:
        # keyids are the signature file's text: no newline or terminal escape may reach the
        # one-line error
        ids = ", ".join(sorted({"".join(c if c.isprintable() else "?" for c in s["keyid"][:16])
                                for s in sigs}))[:200]
        raise TrustError(f"{where}: signed by key {ids}, which is not a trusted key "
                         f"(trusted: {', '.join(k[:16] for k in keys)})")
    good = False
    for s in known:
        if message is None or not _HEX.fullmatch(s["sig"]) or len(s["sig"]) != 128:
            continue
        try:
            ed.Ed25519PublicKey.from_public_bytes(keys[s["keyid"]]).verify(
                bytes.fromhex(s["sig"]), message)
            good = True
            break
        except InvalidSignature:
            continue
    if not good:
        raise TrustError(f"{where}: bad signature by trusted key {known[0]['keyid'][:16]} "
                         "(the signature file was altered or forged)")
    _check_signed_fields(signed, where)
    digest = manifest_sha256(raw)
    if signed["manifest_sha256"] != digest:
        raise TrustError(f"{where}: the signature is for another manifest (signed sha256 "
                         f"{signed['manifest_sha256'][:16]}, manifest.json has {digest[:16]}): "
                         "manifest.json was changed after signing, or comes from another "
                         "release")
    ident = package_identity(manifest, where)
    if ident is None or ident != (signed.get("name"), signed.get("version")):
        raise TrustError(f"{where}: the signature is for model {signed.get('name')!r} version "
                         f"{signed.get('version')}, the manifest says "
                         f"{'nothing' if ident is None else f'{ident[0]!r} version {ident[1]}'}")
    if signed["expires"] is not None:
        try:
            expires = dt.datetime.fromisoformat(signed["expires"].replace("Z", "+00:00"))
            if expires.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError:
            raise TrustError(f"{where}: signed content is malformed (expires "
                             f"{signed['expires'][:40]!r})") from None
        now = now or dt.datetime.now(dt.timezone.utc)
        if now >= expires:
            raise TrustError(f"{where}: the signature expired at {_iso(expires)} (a mirror "
                             "may be replaying an old release: freeze attack); the publisher "
                             "must sign it again (p2u sign --expires)")
    return signed


def _canonical_ok(signed: Any) -> bool:
    try:
        _canonical(signed)
        return True
    except (ValueError, TypeError, RecursionError):
        return False


# ---------------------------------------------------------------- versions


def state_dir() -> Path:
    """Where the version state lives: ``$P2U_STATE_DIR``, else ``$XDG_STATE_HOME/p2u``, else
    ``~/.local/state/p2u``."""
    env = os.environ.get("P2U_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "p2u"


class VersionState:
    """The versions this device accepted, per model name, in ``directory/versions.json``.

    ``{"format": "p2u-versions", "models": {name: {"version": int, "digest": hex}}}``; the digest
    is the sha256 of the accepted manifest's canonical JSON. Written atomically under a lock.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else state_dir()
        self.path = self.directory / STATE_NAME

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = _read_capped(self.path, MAX_MANIFEST, "version state")
        except (FileNotFoundError, NotADirectoryError):  # nothing recorded (yet)
            return {}
        except (OSError, FormatError) as e:
            raise TrustError(f"{self.path}: cannot read the version state ({e}); remove it "
                             "to start over") from e
        try:
            state = json.loads(data)
            models = state["models"]
            if state.get("format") != "p2u-versions" or not isinstance(models, dict) \
                    or not all(isinstance(v, dict) and isinstance(v.get("version"), int)
                               for v in models.values()):
                raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise TrustError(f"{self.path}: the version state is not valid ({str(e)[:60]}); "
                             "remove it to start over") from None
        return models

    def check(self, manifest: Mapping[str, Any], where: str, *,
              allow_rollback: bool = False, authenticated: bool = True) -> None:
        """:class:`TrustError` if ``manifest`` is older than the version accepted before, or
        (for an ``authenticated`` manifest: pinned or signed) the same version with other
        content, unless ``allow_rollback``. Without a pin or a signature anybody can write any
        version, so a second encode with the same version is taken as a new build, not as
        an equivocation; a lower version is still refused (a stale mirror)."""
        ident = package_identity(manifest, where)
        if ident is None or allow_rollback:
            return
        name, version = ident
        seen = self.load().get(name)
        if seen is None:
            return
        if version < seen["version"]:
            msg = (f"{where}: model {name!r} version {version} is older than version "
                   f"{seen['version']} accepted before (rollback refused; state in "
                   f"{self.path})")
            raise TrustError(f"{msg}; pass allow_rollback=True to accept it",
                             cli=f"{msg}; use --allow-rollback to accept it")
        if authenticated and version == seen["version"] \
                and _identity_digest(manifest) != seen.get("digest"):
            msg = (f"{where}: model {name!r} version {version} differs from the version "
                   f"{version} accepted before (same version, other content: mix-and-match, "
                   "or a package encoded again without a higher --version)")
            raise TrustError(f"{msg}; pass allow_rollback=True to accept it",
                             cli=f"{msg}; use --allow-rollback to accept it")

    def record(self, manifest: Mapping[str, Any], *, replace: bool = False) -> bool:
        """Remember ``manifest``'s version when it is higher than the one remembered (or with
        ``replace``, whatever it is); returns whether the state changed. A state that cannot be
        written is a warning (the package was accepted; later checks have less to go on)."""
        ident = package_identity(manifest)
        if ident is None:
            return False
        name, version = ident
        entry = {"version": version, "digest": _identity_digest(manifest)}
        try:
            with self._locked():
                models = self.load()
                seen = models.get(name)
                if seen == entry or (not replace and seen is not None
                                     and seen["version"] > version):
                    return False
                models[name] = entry
                atomic_write_bytes(self.path, json.dumps(
                    {"format": "p2u-versions", "models": models}, indent=1,
                    sort_keys=True).encode() + b"\n")
            return True
        except (OSError, P2UError) as e:
            if isinstance(e, TrustError):
                raise
            warnings.warn(f"p2u: cannot record version {version} of model {name!r} in "
                          f"{self.path} ({e}); rollback protection cannot remember it (set "
                          "P2U_STATE_DIR to a writable folder)", RuntimeWarning, stacklevel=3)
            return False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fcntl is None:  # pragma: no cover
            yield
            return
        # O_NOFOLLOW: a link planted as the lock file creates nothing elsewhere
        fd = os.open(self.directory / (STATE_NAME + ".lock"),
                     os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- what a caller asks for


@dataclass(frozen=True)
class Policy:
    """What a caller asked for: a pin, trusted keys, whether a rollback is accepted.

    Build it with :meth:`make` from the public keyword arguments (``expect=``, ``trust=``,
    ``allow_rollback=``); bad arguments fail there, before anything is fetched.
    """

    expect: str | None = None
    keys: Mapping[str, bytes] = field(default_factory=dict)
    allow_rollback: bool = False

    @classmethod
    def make(cls, expect: str | None = None, trust: TrustSpec | None = None,
             allow_rollback: bool = False) -> Policy:
        keys = load_trusted_keys(trust) if trust is not None else {}
        if keys:
            _crypto()  # missing extra: say so now, not after a download
        return cls(None if expect is None else parse_pin(expect), keys, bool(allow_rollback))

    @property
    def authenticates(self) -> bool:
        """Whether a pin or a signature is asked for."""
        return self.expect is not None or bool(self.keys)

    def check_pin(self, raw: bytes, where: str) -> None:
        if self.expect is not None and manifest_sha256(raw) != self.expect:
            raise TrustError(f"{where}: sha256 {manifest_sha256(raw)} does not match the pinned "
                             f"sha256:{self.expect[:16]}... (altered, or another package)")

    def admit(self, raw: bytes, where: str,
              signature: bytes | None | Callable[[], bytes | None] = None) -> dict[str, Any]:
        """Pin, then parse, then signature: the manifest parsed from ``raw``, or
        :class:`TrustError`. ``signature`` (bytes or a function giving them) is only read
        when keys are trusted. Versions are not checked here (see :meth:`check_version`)."""
        self.check_pin(raw, where)
        manifest = parse_manifest(raw, where)
        if self.keys:
            sig = signature() if callable(signature) else signature
            check_signature(sig, raw, manifest, self.keys, where)
        return manifest

    def check_version(self, manifest: Mapping[str, Any], where: str,
                      state: VersionState | None = None) -> None:
        (state or VersionState()).check(manifest, where, allow_rollback=self.allow_rollback,
                                        authenticated=self.authenticates)

    def record(self, manifest: Mapping[str, Any], state: VersionState | None = None) -> bool:
        return (state or VersionState()).record(manifest, replace=self.allow_rollback)

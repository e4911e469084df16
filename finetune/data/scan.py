"""Pre-flight check of image files, and Pillow decoding for the files TensorFlow gets wrong.

Pure python (Pillow, numpy; never tensorflow): `load_folder` checks every file before TF is imported,
so a bad file is reported with its path (or skipped) instead of failing a batch hours into training.

What each file gets (times per file, one thread, measured on the 2-core test machine):
  * every file: Pillow identifies it (magic bytes + header: ~0.05-0.1 ms);
  * JPEG: decoded at 1/8 scale (`draft`), which still reads every entropy-coded byte, so a truncated
    or broken file is found (~0.2 ms for 32 px, ~1 ms for 500x375, ~5 ms for 2 MP, ~40 ms for 12 MP);
  * other formats: fully decoded when the file is small (FULL_DECODE_BYTES) or all of the dataset's
    non-JPEG files together are (FULL_DECODE_BUDGET) (~0.2 ms for 32 px, ~15 ms for a 200 KB PNG);
    otherwise `verify()` (PNG: every chunk's CRC, which finds truncation and flipped bits, ~1 ms/MB).
Files are checked by a thread pool (Pillow releases the GIL while decoding), and the results are kept
in a small JSON cache keyed by path, size and modification time, so the next run (or sweep job) over
the same folder re-checks only new or changed files.

A file is decoded by Pillow instead of tf.io.decode_image (`FileCheck.pillow`) when TensorFlow would
decode it wrongly or not at all: an EXIF orientation other than "normal" (TF ignores EXIF), BMP (TF
rejects 1-bit BMPs and returns palette indices for 8-bit ones) and formats TF does not read (e.g. a
TIFF or WebP file named .jpg). Everything else (grayscale, RGBA, palette with or without
transparency, 16-bit PNG, CMYK JPEG) is decoded by TensorFlow correctly (tests/test_bad_data.py).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from finetune.config.paths import cache_dir

# Formats tf.io.decode_image reads correctly (MPO: a camera JPEG with extra frames after the first).
TF_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF"})
FULL_DECODE_BYTES = 64 * 1024  # non-JPEG files up to this size are always decoded in full ...
FULL_DECODE_BUDGET = 64 * 2**20  # ... and all of them when together they are at most this big (~5 s)
SCAN_VERSION = 1  # bump when check_file's verdicts change: older cache files are ignored
PROBLEMS = ("unreadable", "empty", "not_image", "truncated", "corrupt", "unsupported")
_LABELS = {"not_image": "not an image"}
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FileCheck:
    path: str
    problem: str | None = None  # None: usable; else one of PROBLEMS
    detail: str = ""
    pillow: bool = False  # decode with Pillow, not TensorFlow (EXIF rotation, BMP, formats TF lacks)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        label = _LABELS.get(self.problem, self.problem)
        return f"{label}: {self.detail}" if self.detail else label

    def as_dict(self) -> dict:
        return {"path": self.path, "problem": self.problem, "detail": self.detail}


def _orientation(image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION, 1)
        return int(value) if value else 1
    except Exception:  # a broken EXIF block: TF ignores it, and so do we
        return 1


def _is_bmp(path: str) -> bool:
    return path.lower().endswith(".bmp")


def _classify_error(error: BaseException) -> tuple[str, str]:
    from PIL import Image, UnidentifiedImageError

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, UnidentifiedImageError):
        return "not_image", "no image format Pillow knows (JPEG, PNG, GIF, BMP, TIFF, WebP, ...)"
    if isinstance(error, Image.DecompressionBombError):
        return "unsupported", text
    lower = text.lower()
    if "truncated" in lower or "broken data stream" in lower or isinstance(error, EOFError) \
            or "premature end" in lower:
        return "truncated", text
    if "decoder" in lower and "not available" in lower or "unsupported" in lower or "not supported" in lower:
        return "unsupported", text
    return "corrupt", f"{type(error).__name__}: {text}"


def check_file(path: str, full: bool = True) -> FileCheck:
    """Whether `path` can be decoded into an RGB image, and by whom (see the module docstring).
    full=False: non-JPEG files over FULL_DECODE_BYTES get verify() instead of a full decode."""
    from PIL import Image

    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        return FileCheck(path, "unreadable", e.strerror or str(e))
    if size == 0:
        return FileCheck(path, "empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency notes, ...
            with Image.open(path) as image:
                fmt, (width, height) = image.format, image.size
                if width < 1 or height < 1:
                    return FileCheck(path, "unsupported", f"{width}x{height} pixels")
                if fmt in ("JPEG", "MPO"):
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    image.load()
                elif full or size <= FULL_DECODE_BYTES or fmt not in TF_FORMATS:
                    image.load()
                else:
                    image.verify()
                # after the decode: PNG may keep its EXIF after the pixels (getexif() would load them
                # and hide a failure); JPEG has it in the header
                exif = fmt in ("JPEG", "MPO") or "exif" in image.info
                pillow = fmt not in TF_FORMATS or _is_bmp(path) or (exif and _orientation(image) != 1)
            if pillow:  # exactly what the pipeline will run: full decode + orientation + conversion
                read_rgb(path)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        problem, detail = _classify_error(e)
        return FileCheck(path, problem, detail)
    return FileCheck(path, pillow=pillow)


def _is_jpeg(path: str) -> bool:
    return path.lower().endswith((".jpg", ".jpeg"))


SCAN_PROGRESS_FROM = 500  # files to check before the scan shows progress (fewer take well under a second)


def scan_files(paths, workers: int | None = None, cache: "str | os.PathLike | None" = None) -> list[FileCheck]:
    """check_file for every path, in order, on a thread pool.

    `cache`: a JSON file of earlier verdicts ({path: [size, mtime_ns, full, problem, detail, pillow]});
    a file whose size and modification time are unchanged is not checked again. Unreadable files are
    never cached (permissions change without touching the file)."""
    from functools import partial

    paths = [str(p) for p in paths]
    stats: dict[str, tuple[int, int] | None] = {}
    for p in paths:
        try:
            st = os.stat(p)
            stats[p] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[p] = None
    other_bytes = sum(stats[p][0] for p in paths if stats[p] and not _is_jpeg(p))
    full = other_bytes <= FULL_DECODE_BUDGET
    known = _read_cache(cache) if cache else {}
    found: dict[str, FileCheck] = {}
    for p in paths:
        entry = known.get(p)
        if stats[p] and isinstance(entry, list) and len(entry) == 6 and tuple(entry[:2]) == stats[p] \
                and (entry[2] or not full):
            found[p] = FileCheck(p, entry[3], entry[4], bool(entry[5]))
    todo = [p for p in dict.fromkeys(paths) if p not in found]
    check = partial(check_file, full=full)
    if len(todo) < 16:
        found.update((p, check(p)) for p in todo)
    else:
        from finetune.progress_bar import progress_bar

        with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool, \
                progress_bar(len(todo), "checking image files", "files", min_total=SCAN_PROGRESS_FROM) as bar:
            for path, verdict in zip(todo, pool.map(check, todo, chunksize=64)):
                found[path] = verdict
                bar.update(1)
    if cache and todo:
        entries = {p: [*stats[p], full, c.problem, c.detail, c.pillow] for p, c in found.items()
                   if stats[p] and c.problem != "unreadable"}
        _write_cache(cache, entries)
    return [found[p] for p in paths]


def cache_file(root: str) -> "os.PathLike":
    """Where the verdicts for the dataset folder `root` are kept ($FINETUNE_CACHE_DIR/scan/...)."""
    import hashlib

    return cache_dir("scan", hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:24] + ".json")


def _read_cache(path) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data["files"] if data.get("version") == SCAN_VERSION and isinstance(data.get("files"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):  # none yet, or unusable: check everything
        return {}


def _write_cache(path, entries: dict) -> None:
    import json
    from pathlib import Path

    from finetune.files import write_text

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(path), json.dumps({"version": SCAN_VERSION, "files": entries}, separators=(",", ":")))
    except OSError:  # a read-only cache folder only costs the next run a re-check
        pass


def needs_pillow(path: str) -> bool:
    """Header-only version of FileCheck.pillow (for single files: predict, classify)."""
    from PIL import Image

    path = str(path)
    if _is_bmp(path):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.format not in TF_FORMATS or _orientation(image) != 1
    except Exception:  # unreadable: let TensorFlow report (or the pipeline drop) it
        return False


def to_rgb_array(image) -> np.ndarray:
    """A Pillow image -> uint8 [h, w, 3]: EXIF orientation applied, 16-bit and float scaled to 0..255,
    alpha dropped (the RGB kept, as TensorFlow does), palette/CMYK/gray converted."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.load()
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            values = np.asarray(image)
            if mode == "F":
                values = values.astype(np.float64)
                scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
                gray = np.clip(np.nan_to_num(values) * scale, 0, 255)
            else:  # 16-bit (Pillow opens 16-bit gray PNG/TIFF as I;16, some as I): 0..65535 -> 0..255;
                # an "I" image whose values all fit 0..255 is 8-bit data in a 32-bit container
                values = values.astype(np.float64)
                eight_bit = mode == "I" and (values.size == 0 or values.max() <= 255)
                gray = np.clip(values if eight_bit else values / 257.0, 0, 255)
            gray = np.rint(gray).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        if mode != "RGB":
            if mode in ("P", "PA", "LA", "La", "RGBa", "1"):
                image = image.convert("RGBA")
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)


def read_rgb(path) -> np.ndarray:
    """An image file decoded by Pillow -> uint8 [h, w, 3] (see to_rgb_array)."""
    from PIL import Image

    with Image.open(str(path)) as image:
        return to_rgb_array(image)


def summary(bad: list[FileCheck]) -> str:
    """'2 truncated, 1 not an image'"""
    counts: dict[str, int] = {}
    for check in bad:
        counts[check.problem] = counts.get(check.problem, 0) + 1
    return ", ".join(f"{n} {_LABELS.get(problem, problem)}" for problem, n in counts.items())

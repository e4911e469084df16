"""The embedded `shapes` dataset: synthetic images of geometric shapes, generated once.

Pure python (numpy + PIL); never imports tensorflow. Each image shows one shape of a random
colour, size, position and rotation on a noisy background (random colour gradient, gaussian
noise, a few distractor lines). Image `i` of class `c` depends only on (seed, c, i, image_size),
so the files are identical across runs and machines with the same numpy/PIL.

Files land in `<cache_dir>/<key>/<class>/<class>_0000.png`, where `<key>` hashes the generator
version and every parameter. The folder is written into a temporary sibling and renamed into
place at the end, so a folder named `<key>` is always complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from finetune.config.paths import cache_dir
from finetune.data._util import suggest
from finetune.errors import ConfigError, DataError

GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
SUPERSAMPLE = 3  # shapes are drawn at 3x then downsampled: smooth, antialiased edges


# ---------------------------------------------------------------------------------------------
# Shape outlines. Each returns polygons in unit coordinates (centre 0,0; radius ~1), which the
# renderer rotates, scales and translates. A "hole" polygon is drawn in the background colour.
# ---------------------------------------------------------------------------------------------
def _regular(n: int, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _circle_pts(r: float = 1.0, n: int = 96, cx: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(w: float = 0.34) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
            (-1, -w), (-w, -w)]


def _arrow() -> list[tuple[float, float]]:
    return [(-1, -0.28), (0.15, -0.28), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.28), (-1, 0.28)]


def _heart(n: int = 80) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 - 0.05))
    return pts


def _scaled(poly, sx: float, sy: float) -> list[tuple[float, float]]:
    return [(x * sx, y * sy) for x, y in poly]


def _arc(r_out: float, r_in: float, start: float, end: float, n: int = 48) -> list[tuple[float, float]]:
    """A ring sector between angles `start` and `end` (radians); r_in=0 gives a pie slice."""
    outer = [(r_out * math.cos(start + (end - start) * k / n), r_out * math.sin(start + (end - start) * k / n))
             for k in range(n + 1)]
    if r_in <= 0:
        return [(0.0, 0.0), *outer]
    inner = [(r_in * math.cos(end - (end - start) * k / n), r_in * math.sin(end - (end - start) * k / n))
             for k in range(n + 1)]
    return outer + inner


# name -> (filled polygons, hole polygons). Shapes after "line" came with the transfer demo's richer
# source task (issue 12); the first 13 render exactly as before.
_SHAPES = {
    "circle": lambda: ([_circle_pts()], []),
    "square": lambda: ([[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]], []),
    "triangle": lambda: ([_regular(3)], []),
    "star": lambda: ([_star()], []),
    "cross": lambda: ([_cross()], []),
    "ring": lambda: ([_circle_pts()], [_circle_pts(0.58)]),
    "pentagon": lambda: ([_regular(5)], []),
    "hexagon": lambda: ([_regular(6)], []),
    "diamond": lambda: ([[(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]], []),  # elongated rhombus
    "crescent": lambda: ([_circle_pts()], [_circle_pts(0.85, cx=0.45)]),
    "arrow": lambda: ([_arrow()], []),
    "heart": lambda: ([_heart()], []),
    "line": lambda: ([[(-1, -0.12), (1, -0.12), (1, 0.12), (-1, 0.12)]], []),
    "octagon": lambda: ([_regular(8)], []),
    "ellipse": lambda: ([_scaled(_circle_pts(), 1.0, 0.5)], []),
    "semicircle": lambda: ([_arc(1.0, 0.0, 0.0, math.pi)], []),
    "pacman": lambda: ([_arc(1.0, 0.0, math.pi / 4, 7 * math.pi / 4)], []),
    "arc": lambda: ([_arc(1.0, 0.6, 0.0, math.pi)], []),
    "rectangle": lambda: ([[(-1, -0.45), (1, -0.45), (1, 0.45), (-1, 0.45)]], []),
    "trapezoid": lambda: ([[(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)]], []),
    "parallelogram": lambda: ([[(-1, 0.5), (0.4, 0.5), (1, -0.5), (-0.4, -0.5)]], []),
    "square_ring": lambda: ([[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]],
                            [[(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)]]),
    "triangle_ring": lambda: ([_regular(3)], [_scaled(_regular(3), 0.45, 0.45)]),
    "star4": lambda: ([_star(4, 0.35)], []),
    "star8": lambda: ([_star(8, 0.6)], []),
    "gear": lambda: ([_star(12, 0.78)], [_circle_pts(0.3)]),
    "l_shape": lambda: ([[(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]], []),
    "t_shape": lambda: ([[(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4),
                          (-1, -0.4)]], []),
    "u_shape": lambda: ([[(-1, -1), (-0.4, -1), (-0.4, 0.4), (0.4, 0.4), (0.4, -1), (1, -1), (1, 1),
                          (-1, 1)]], []),
    "chevron": lambda: ([[(-1, -0.9), (-0.4, -0.9), (0.6, 0), (-0.4, 0.9), (-1, 0.9), (0, 0)]], []),
    "hourglass": lambda: ([[(-0.8, -1), (0.8, -1), (0.08, 0), (0.8, 1), (-0.8, 1), (-0.08, 0)]], []),
    "two_dots": lambda: ([_circle_pts(0.42, cx=-0.55), _circle_pts(0.42, cx=0.55)], []),
    "three_bars": lambda: ([[(-1, y - 0.16), (1, y - 0.16), (1, y + 0.16), (-1, y + 0.16)]
                            for y in (-0.65, 0.0, 0.65)], []),
    "teardrop": lambda: ([[(0.0, -1.0)] + [(0.55 * math.cos(a), 0.35 + 0.55 * math.sin(a))
                                            for a in np.linspace(-0.15 * math.pi, 1.15 * math.pi, 40)]], []),
}
SUPPORTED_CLASSES = tuple(_SHAPES)


def validate_classes(classes) -> list[str]:
    """Checks `data.classes`; returns it as a list of str."""
    expected = f"a list of at least two distinct shape names from {', '.join(SUPPORTED_CLASSES)}"
    if isinstance(classes, str) or classes is None:
        raise ConfigError("data.classes", classes, expected, "e.g. data.classes=[circle,square,star]")
    classes = [str(c) for c in classes]
    for c in classes:
        if c not in _SHAPES:
            raise ConfigError("data.classes", c, expected, suggest(c, SUPPORTED_CLASSES))
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError("data.classes", classes, expected)
    return classes


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 HxWx3 in 0..255: random two-colour linear gradient plus gaussian noise."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    return img.astype(np.float32)


def _pick_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple[int, int, int]:
    """A random colour that stands out from the background mean (deterministic given rng)."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - bg_mean))
        if d > best_d:
            best, best_d = c, d
        if d > 110:
            break
    return tuple(int(v) for v in best)


TEXTURES = ("solid", "stripes", "checker", "dots", "gradient")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 HxWx1 in 0..1: which of the shape's two colours each pixel takes (a random pattern among
    TEXTURES, with a random period, phase and angle)."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(3.0, 7.0) * size / 32.0
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
    v = -xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, period)
    if kind == "solid":
        t = np.zeros_like(xx)
    elif kind == "stripes":
        t = (np.mod(u, period) < period / 2).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(u / period * 2) + np.floor(v / period * 2)) % 2).astype(np.float32)
    elif kind == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        t = (du * du + dv * dv < (period * 0.3) ** 2).astype(np.float32)
    else:  # gradient across the image
        t = np.clip(u / size, 0, 1)
    return t[..., None]


def _with_lines(rng: np.random.Generator, bg: np.ndarray, s: int) -> np.ndarray:
    """The background with 0-3 random distractor lines of random colour, opacity and width."""
    from PIL import Image, ImageDraw

    lines = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(0, 4))):
        p = rng.uniform(0, s, 4)
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3)) + (int(rng.uniform(90, 200)),)
        ldraw.line([(p[0], p[1]), (p[2], p[3])], fill=colour, width=int(rng.integers(1, max(2, s // 24) + 1)))
    la = np.asarray(lines, dtype=np.float32)
    alpha = la[..., 3:4] / 255.0
    return bg * (1 - alpha) + la[..., :3] * alpha


def render(kind: str, index: int, image_size: int, seed: int, textured: bool = False) -> np.ndarray:
    """Image `index` of class `kind` as uint8 HxWx3. Deterministic in its arguments.

    textured=True fills the shape with a random two-colour texture (stripes, checker, dots, gradient or
    solid) instead of one colour; the texture's randomness comes from its own stream, so the shape,
    background and noise are the same image for image as untextured."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(kind.encode()), int(index)])
    s = int(image_size)
    big = s * SUPERSAMPLE

    bg = _background(rng, s)
    bg_mean = bg.reshape(-1, 3).mean(0)
    fill = _pick_colour(rng, bg_mean)

    # Shape geometry in the supersampled canvas.
    radius = rng.uniform(0.2, 0.4) * big
    margin = radius * 1.02
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    theta = rng.uniform(0, 2 * math.pi)
    stretch = rng.uniform(0.85, 1.15)  # mild aspect jitter
    cos_t, sin_t = math.cos(theta), math.sin(theta)

    def place(poly):
        out = []
        for x, y in poly:
            x, y = x * stretch, y / stretch
            out.append((cx + radius * (x * cos_t - y * sin_t), cy + radius * (x * sin_t + y * cos_t)))
        return out

    filled, holes = _SHAPES[kind]()
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly in filled:
        draw.polygon(place(poly), fill=255)
    for poly in holes:
        draw.polygon(place(poly), fill=0)
    mask = np.asarray(mask.resize((s, s), Image.Resampling.LANCZOS), dtype=np.float32)[..., None] / 255.0

    img = _with_lines(rng, bg, s)  # drawn before the shape, so they pass behind it

    shade = rng.uniform(0.85, 1.0)  # slight shading variation inside the shape
    colour = np.asarray(fill, np.float32) * shade
    if textured:
        trng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(kind.encode()), int(index), 1])
        second = np.clip(colour * trng.uniform(0.25, 0.6) + trng.uniform(0, 255, 3) * 0.3, 0, 255)
        t = _texture(trng, s)
        colour = colour * (1 - t) + second * t
    img = img * (1 - mask) + colour * mask
    img = img + rng.normal(0.0, rng.uniform(4.0, 22.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Cache folder
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return cache_dir("shapes")


def dataset_key(classes, num_per_class: int, image_size: int, seed: int, textured: bool = False) -> str:
    params = {"version": GENERATOR_VERSION, "classes": list(classes), "num_per_class": int(num_per_class),
              "image_size": int(image_size), "seed": int(seed)}
    if textured:  # untextured keys stay what they were before textures existed
        params["textured"] = True
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: exists, owned by someone else
        return True
    return True


def _remove_stale_temps(cache_dir: Path, key: str) -> None:
    """Removes temp folders left by interrupted generations (same host, dead pid)."""
    for tmp in cache_dir.glob(f".tmp-{key}-*"):
        try:
            pid = int(tmp.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def check_options(classes, num_per_class, image_size) -> list[str]:
    """The generator's options checked (data.classes, data.num_per_class, data.image_size); returns the
    classes as a list of str. Run by finetune.app.checks.check_data before anything starts, and here."""
    classes = validate_classes(classes)
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, (int, np.integer)) or num_per_class < 1:
        raise ConfigError("data.num_per_class", num_per_class, "an integer >= 1 (images per class)")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 8 <= image_size <= 1024:
        raise ConfigError("data.image_size", image_size, "an integer between 8 and 1024 (pixels)")
    return classes


def _unwritable(cache_dir: Path, error: OSError) -> DataError:
    return DataError(f"data.cache_dir: cannot write the shapes dataset to '{cache_dir}' ({error.strerror or error}); "
                     "set data.cache_dir=<writable folder> or the FINETUNE_CACHE_DIR environment variable")


def _temp_folder(cache_dir: Path, key: str) -> Path:
    """A new temporary folder beside where the dataset `key` goes (stale ones of dead writers removed)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(cache_dir, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=cache_dir))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder is a shared cache
        return tmp
    except OSError as e:
        raise _unwritable(cache_dir, e) from e


def _write_images(tmp: Path, classes: list[str], num_per_class: int, image_size: int, seed: int,
                  textured: bool = False) -> None:
    from PIL import Image

    for c in classes:
        (tmp / c).mkdir()
        for i in range(num_per_class):
            Image.fromarray(render(c, i, image_size, seed, textured)).save(tmp / c / f"{c}_{i:04d}.png",
                                                                             optimize=False)
    manifest = {"version": GENERATOR_VERSION, "classes": classes, "num_per_class": num_per_class,
                "image_size": int(image_size), "seed": int(seed), "textured": bool(textured),
                "images": len(classes) * num_per_class}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _move_into_place(tmp: Path, final: Path, key: str) -> None:
    """Rename the finished `tmp` to `final`; a concurrent writer that finished first wins."""
    if final.exists() and not _is_complete(final):
        # A folder without manifest was not written by us (or by an older, non-atomic writer).
        broken = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-old-", dir=final.parent))
        os.replace(final, broken / "old")
        shutil.rmtree(broken, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent generation finished first: use its folder


def ensure_shapes(classes, num_per_class: int, image_size: int, seed: int, cache_dir=None,
                  verbose: bool = True, textured: bool = False) -> Path:
    """Returns the folder of the shapes dataset, generating it first if needed.

    The folder holds one sub-folder per class, like a `folder` dataset.
    """
    classes = check_options(classes, num_per_class, image_size)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = dataset_key(classes, num_per_class, image_size, seed, textured)
    final = cache_dir / key
    if _is_complete(final):
        return final
    tmp = _temp_folder(cache_dir, key)
    if verbose:
        print(f"generating shapes dataset: {len(classes) * int(num_per_class)} images -> {final}",
              file=sys.stderr, flush=True)
    try:
        _write_images(tmp, classes, int(num_per_class), image_size, seed, textured)
        _move_into_place(tmp, final, key)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(cache_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

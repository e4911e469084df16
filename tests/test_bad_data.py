"""Bad data is handled per file: the pre-flight scan, data.on_bad_file, train-time decode errors,
and the conversions (gray, RGBA, CMYK, palette, 16-bit, EXIF orientation) to RGB uint8."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import load_dataset
from finetune.data.scan import check_file, needs_pillow, read_rgb, scan_files
from finetune.data.sources import Dataset, Split
from finetune.errors import ConfigError, DataError
from tests.conftest import TINY, assert_recorded, runs_of

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def scan_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "finetune_cache"))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (gray [h, w] or RGB [h, w, 3] uint16), written by hand: Pillow cannot write 16-bit RGB."""
    values = values if values.ndim == 3 else values[..., None]
    h, w, c = values.shape
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def corrupt_png(source: Path, path: Path) -> Path:
    """A PNG whose compressed pixels are garbage but whose chunk CRCs are right: Pillow's header check
    and verify() pass, every decoder fails."""
    raw = bytearray(source.read_bytes())
    at = raw.find(b"IDAT")
    n = struct.unpack(">I", raw[at - 4:at])[0]
    data = bytes(b ^ 0x5A if 10 <= i < n - 6 else b for i, b in enumerate(raw[at + 4:at + 4 + n]))
    raw[at + 4:at + 4 + n] = data
    raw[at + 4 + n:at + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + data) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


def noise(seed: int, size=32) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def write_bad(folder: Path) -> dict[str, str]:
    """Files no decoder can use: {name: expected problem}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(1)).save(folder / "whole.jpg", quality=90)
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(noise(2)).save(folder / "good_source.png")
    corrupt_png(folder / "good_source.png", folder / "garbled.png")
    (folder / "good_source.png").unlink()
    return {"truncated.jpg": "truncated", "text.jpg": "not_image", "empty.png": "empty", "garbled.png": "corrupt"}


def write_convertible(folder: Path) -> dict[str, tuple]:
    """Images TensorFlow's plain RGB decode would get wrong or that need a conversion:
    {name: (expected decoded (h, w), {(row, col): expected RGB})}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # pure red
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, 16:, 3] = 255  # left half fully transparent: its RGB is kept all the same
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    gray16 = np.zeros((32, 32), np.uint16)
    gray16[:, 11:22], gray16[:, 22:] = 32896, 65535  # 32896 = 128 * 257
    png16(folder / "gray16.png", gray16)
    png16(folder / "rgb16.png", np.broadcast_to(np.array([65535, 32896, 0], np.uint16), (32, 32, 3)).copy())
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 200, 30, 250, 250, 5] + [0] * 762)
    palette.paste(1, (0, 16, 32, 32))
    palette.save(folder / "palette.png")
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.new("L", (32, 32), 77).save(folder / "gray.jpg", quality=95)
    # stored 48 wide x 32 high, left half red, right half blue; EXIF orientation 6 = "rotate 90 degrees
    # clockwise to display": shown 32 wide x 48 high, red on top, blue below
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :24], stored[:, 24:] = RED, BLUE
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    return {
        "cmyk.jpg": ((32, 32), {(16, 16): RED}),
        "rgba.png": ((32, 32), {(16, 4): (200, 100, 50), (16, 28): (200, 100, 50)}),
        "gray16.png": ((32, 32), {(5, 4): (0, 0, 0), (5, 16): (128, 128, 128), (5, 28): (255, 255, 255)}),
        "rgb16.png": ((32, 32), {(16, 16): (255, 128, 0)}),
        "palette.png": ((32, 32), {(4, 16): (10, 200, 30), (28, 16): (250, 250, 5)}),
        "palette_transparent.png": ((32, 32), {(4, 16): (10, 200, 30), (28, 16): (250, 250, 5)}),
        "gray.jpg": ((32, 32), {(16, 16): (77, 77, 77)}),
        "exif_rotated.jpg": ((48, 32), {(8, 16): RED, (40, 16): BLUE}),
    }


def write_good(folder: Path, n: int, seed: int, colour) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(np.asarray(colour, np.int16) + (noise(seed + i) // 4).astype(np.int16) - 32, 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        image.save(folder / f"good_{i}.{'png' if i % 2 else 'jpg'}")


def bad_data_folder(root: Path, per_class: int = 12) -> tuple[Path, int, set[str]]:
    """3 classes of good images + convertible images in class a + bad files spread over a and b.
    Returns (root, number of usable images, paths of the bad files)."""
    for name, colour, seed in (("a", (220, 60, 60), 0), ("b", (60, 220, 60), 100), ("c", (60, 60, 220), 200)):
        write_good(root / name, per_class, seed, colour)
    convertible = write_convertible(root / "a")
    bad = write_bad(root / "a")
    (root / "b" / "truncated.jpg").write_bytes((root / "a" / "truncated.jpg").read_bytes())
    bad_paths = {str(root / "a" / name) for name in bad} | {str(root / "b" / "truncated.jpg")}
    return root, 3 * per_class + len(convertible), bad_paths


# ---------------------------------------------------------------------------------------------
# The scan (pure python, no TensorFlow)
# ---------------------------------------------------------------------------------------------
def test_scan_names_each_bad_file_and_what_is_wrong(tmp_path):
    bad = write_bad(tmp_path)
    convertible = write_convertible(tmp_path)
    checks = {Path(c.path).name: c for c in scan_files(sorted(str(p) for p in tmp_path.iterdir()))}
    for name, problem in bad.items():
        assert checks[name].problem == problem, checks[name]
        assert checks[name].describe()
    for name in convertible:
        assert checks[name].ok, checks[name]
    # only what TensorFlow gets wrong goes through Pillow: here, the EXIF orientation
    assert {n for n, c in checks.items() if c.pillow} == {"exif_rotated.jpg"}
    assert needs_pillow(str(tmp_path / "exif_rotated.jpg")) and not needs_pillow(str(tmp_path / "cmyk.jpg"))
    unreadable = check_file(str(tmp_path / "missing.jpg"))
    assert unreadable.problem == "unreadable"


def test_scan_routes_formats_tensorflow_lacks_to_pillow(tmp_path):
    Image.fromarray(noise(3)).save(tmp_path / "tiff_named.jpg", format="TIFF")
    Image.fromarray(noise(4)).save(tmp_path / "real.bmp")
    checks = {Path(c.path).name: c for c in scan_files([tmp_path / "tiff_named.jpg", tmp_path / "real.bmp"])}
    assert checks["tiff_named.jpg"].ok and checks["tiff_named.jpg"].pillow
    assert checks["real.bmp"].ok and checks["real.bmp"].pillow
    assert (read_rgb(tmp_path / "tiff_named.jpg") == noise(3)).all()


@pytest.mark.parametrize("name", ["cmyk.jpg", "rgba.png", "gray16.png", "rgb16.png", "palette.png",
                                  "palette_transparent.png", "gray.jpg", "exif_rotated.jpg"])
def test_pillow_conversion_to_rgb(tmp_path, name):
    shape, pixels = write_convertible(tmp_path)[name]
    rgb = read_rgb(tmp_path / name)
    assert rgb.dtype == np.uint8 and rgb.shape == (*shape, 3)
    for (row, col), colour in pixels.items():
        assert np.abs(rgb[row, col].astype(int) - colour).max() <= 8, (name, row, col, rgb[row, col], colour)


@pytest.mark.parametrize("values,mode,expected", [
    (np.full((2, 3), 32896, np.uint16), "I;16", 128),  # 16-bit: 0..65535 -> 0..255
    (np.full((2, 3), 65535, np.int32), "I", 255),
    (np.full((2, 3), 200, np.int32), "I", 200),  # 8-bit values in a 32-bit image stay as they are
    (np.full((2, 3), 0.5, np.float32), "F", 128),  # float in 0..1
])
def test_high_bit_depth_modes_scale_to_uint8(values, mode, expected):
    from finetune.data.scan import to_rgb_array

    image = Image.fromarray(values)
    assert image.mode == mode
    rgb = to_rgb_array(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3) and (rgb == expected).all()


def test_scan_results_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from finetune.data import scan

    write_good(tmp_path / "x", 20, 0, (200, 0, 0))
    paths = sorted(str(p) for p in (tmp_path / "x").iterdir())
    cache = scan.cache_file(str(tmp_path))
    assert all(c.ok for c in scan_files(paths, cache=cache))
    checked = []
    real = scan.check_file
    monkeypatch.setattr(scan, "check_file", lambda p, full=True: checked.append(p) or real(p, full))
    assert all(c.ok for c in scan_files(paths, cache=cache)) and checked == []
    whole = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(whole[:-200])  # changed: checked again, found truncated
    again = scan_files(paths, cache=cache)
    assert checked == [paths[0]] and again[0].problem == "truncated" and all(c.ok for c in again[1:])


def folder_cfg(path, **extra):
    return {"source": "folder", "name": "folder", "path": str(path), "val_split": 0.25, **extra}


def test_skip_drops_bad_files_from_every_split(tmp_path, capsys):
    root, usable, bad_paths = bad_data_folder(tmp_path / "photos", per_class=4)
    dataset = load_dataset(folder_cfg(root))
    kept = dataset.train.paths + dataset.val.paths
    assert dataset.train.size + dataset.val.size == usable == len(kept)
    assert not set(kept) & bad_paths  # so the feature cache's file fingerprint never sees them either
    assert {s["path"] for s in dataset.skipped} == bad_paths
    assert all(s["problem"] and s["detail"] for s in dataset.skipped)
    flagged = {Path(p).name for split in (dataset.train, dataset.val)
               for p, pil in zip(split.paths, split.pillow) if pil}
    assert flagged == {"exif_rotated.jpg"}
    out = capsys.readouterr().out
    assert f"skipped {len(bad_paths)} of {usable + len(bad_paths)} files" in out


def test_fail_names_the_bad_files_in_one_line(tmp_path):
    root, usable, bad_paths = bad_data_folder(tmp_path / "photos", per_class=4)
    with pytest.raises(DataError) as info:
        load_dataset(folder_cfg(root, on_bad_file="fail"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.on_bad_file=fail")
    assert f"{len(bad_paths)} of {usable + len(bad_paths)} files" in message
    assert sum(path in message for path in bad_paths) == 3 and "and 2 more" in message
    with pytest.raises(ConfigError, match="(?i)did you mean 'skip'"):
        load_dataset(folder_cfg(root, on_bad_file="skp"))


def test_bad_files_in_val_path_and_classes_left_empty(tmp_path):
    root = tmp_path / "train"
    write_good(root / "x", 3, 0, (200, 0, 0))
    write_good(root / "y", 3, 10, (0, 200, 0))
    val = tmp_path / "val"
    write_good(val / "x", 2, 20, (200, 0, 0))
    write_bad(val / "y")
    dataset = load_dataset(folder_cfg(root, val_path=str(val)))
    assert dataset.val.size == 2 and len(dataset.skipped) == 4
    assert all(p.startswith(str(val / "x")) for p in dataset.val.paths)
    only_bad = tmp_path / "only_bad"
    write_good(only_bad / "x", 3, 0, (200, 0, 0))
    write_bad(only_bad / "y")
    with pytest.raises(DataError, match="'y'"):
        load_dataset(folder_cfg(only_bad))


def test_on_bad_file_is_in_the_folder_schema():
    from finetune.app.hydra_app import precheck

    assert precheck("train", ["data=folder", "data.path=/x", "data.on_bad_file=fail"]) is None
    message = precheck("train", ["data=folder", "data.path=/x", "data.on_bad_file=skp"])
    assert message.startswith("data.on_bad_file") and "skp" in message and "skip" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Decoding as the pipeline does it (TensorFlow)
# ---------------------------------------------------------------------------------------------
def test_pipeline_decodes_conversions_to_the_right_colours(tmp_path):
    import tensorflow as tf

    from finetune.data.pipeline import decode_file

    expected = write_convertible(tmp_path)
    for check in scan_files(sorted(str(tmp_path / name) for name in expected)):
        shape, pixels = expected[Path(check.path).name]
        for pillow in (check.pillow, None):  # the scan's routing, and the header check predict uses
            flag = None if pillow is None else tf.constant(pillow)
            rgb = decode_file(tf.constant(check.path), shape, flag).numpy()
            assert rgb.dtype == np.uint8 and rgb.shape == (*shape, 3)
            for (row, col), colour in pixels.items():
                got = rgb[row, col].astype(int)
                assert np.abs(got - colour).max() <= 8, (check.path, pillow, row, col, got, colour)
        # inside a tf.data map too (graph mode), as predict runs it
        graph = next(iter(tf.data.Dataset.from_tensors(check.path).map(lambda p: decode_file(p, shape)))).numpy()
        assert (graph == decode_file(tf.constant(check.path), shape, tf.constant(check.pillow)).numpy()).all()
        # both decoders agree where both apply (so routing a file to Pillow changes nothing else)
        if not check.pillow:
            tf_rgb = decode_file(tf.constant(check.path), shape, tf.constant(False)).numpy().astype(int)
            pil_rgb = decode_file(tf.constant(check.path), shape, tf.constant(True)).numpy().astype(int)
            tolerance = 12 if check.path.endswith(".jpg") else 1  # JPEG: IDCT/upsampling differ slightly
            assert np.abs(tf_rgb - pil_rgb).max() <= tolerance, check.path


def test_a_file_that_passes_the_scan_but_fails_in_tensorflow_is_dropped_alone(tmp_path, monkeypatch):
    """Over the full-decode budget, a large PNG gets verify() only: one whose compressed pixels are
    garbage (with valid CRCs) passes the scan, and training drops just that file."""
    from finetune.data import make_pipeline, scan

    root = tmp_path / "photos"
    write_good(root / "x", 5, 0, (200, 0, 0))
    write_good(root / "y", 5, 10, (0, 200, 0))
    Image.fromarray(noise(5, size=200)).save(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size > scan.FULL_DECODE_BYTES
    corrupt_png(tmp_path / "big.png", root / "y" / "big_garbled.png")
    monkeypatch.setattr(scan, "FULL_DECODE_BUDGET", 0)
    dataset = load_dataset(folder_cfg(root, val_split=0.2))
    garbled = str(root / "y" / "big_garbled.png")
    assert dataset.skipped == [] and garbled in dataset.train.paths + dataset.val.paths
    seen = []
    for split in ("train", "val"):
        part = getattr(dataset, split)
        labels = [y.numpy().tolist() for _, y in make_pipeline(dataset, split, 16, 4, training=split == "train",
                                                                seed=0)]
        expected = [int(y) for p, y in zip(part.paths, part.labels) if p != garbled]
        assert sorted(sum(labels, [])) == sorted(expected)
        assert [len(b) for b in labels[:-1]] == [4] * (len(labels) - 1)  # only the last batch is short
        seen += sum(labels, [])
    assert sorted(seen) == [0] * 5 + [1] * 5


def test_a_decode_error_at_train_time_drops_that_file_not_its_batch(tmp_path):
    """Files that pass the scan's header check but fail to decode (here: handed to the pipeline without
    the scan, through both decoders) are dropped one by one; every good image still arrives."""
    from finetune.data import make_pipeline

    write_good(tmp_path, 5, 0, (100, 100, 100))
    bad = write_bad(tmp_path / "bad")
    good = sorted(str(p) for p in tmp_path.glob("good_*"))
    bad_paths = [str(tmp_path / "bad" / name) for name in bad]
    paths = [bad_paths[0], *good[:2], bad_paths[3], *good[2:], bad_paths[1]]
    labels = np.arange(len(paths), dtype=np.int32)
    pillow = [False, False, False, True, False, False, False, False]  # garbled.png through Pillow too
    split = Split(paths=paths, labels=labels, size=len(paths), pillow=pillow)
    dataset = Dataset(name="mixed", class_names=[str(i) for i in range(len(paths))], train=split, val=split,
                      test=None, source_cfg=None)
    for training, cache in ((False, "off"), (True, "memory")):
        batches = [y.numpy().tolist() for _, y in make_pipeline(dataset, "train", 16, 4, training=training,
                                                                 seed=0, cache=cache)]
        assert sorted(sum(batches, [])) == [1, 2, 4, 5, 6], batches
        assert [len(b) for b in batches] == [4, 1]


# ---------------------------------------------------------------------------------------------
# Through the real CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_on_a_bad_data_folder(cli, mlflow_client, tmp_path):
    root, usable, bad_paths = bad_data_folder(tmp_path / "photos")
    # also the run of a folder of photos: JPEG and PNG, RGB, grey, RGBA, palette, CMYK, 16-bit, EXIF-rotated
    result = cli("train", *TINY, "data=folder", f"data.path={root}", "data.val_split=0.25", experiment="bad_data")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {len(bad_paths)} of {usable + len(bad_paths)} files" in result.stdout
    (run,) = runs_of(mlflow_client, "bad_data")
    assert_recorded(mlflow_client, run, epochs=1, classes=["a", "b", "c"])
    params = run.data.params
    assert params["dataset"].startswith("folder")
    assert int(params["train_size"]) + int(params["val_size"]) == usable
    assert params["skipped_files"] == str(len(bad_paths))
    local = mlflow_client.download_artifacts(run.info.run_id, "skipped_files.json", str(tmp_path))
    skipped = json.loads(Path(local).read_text())
    assert {s["path"] for s in skipped} == bad_paths
    assert {s["problem"] for s in skipped} == {"truncated", "not_image", "empty", "corrupt"}

    result = cli("train", *TINY, "data=folder", f"data.path={root}", "data.on_bad_file=fail",
                 experiment="bad_data_fail")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.on_bad_file=fail"), lines
    assert any(path in lines[0] for path in bad_paths)
    exp = mlflow_client.get_experiment_by_name("bad_data_fail")
    assert exp is None or not mlflow_client.search_runs([exp.experiment_id])

"""Tests for finetune.data: sources (shapes, digits, folder, tfds) and tf.data pipelines. Offline."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
from PIL import Image

from finetune.data import load_dataset, scan_folder, stratified_split
from finetune.data import shapes as shapes_mod
from finetune.errors import ConfigError, DataError, FinetuneError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "star"]


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    """Never write into the user's ~/.cache during tests."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "ftcache"))


def shapes_cfg(tmp_path, **kw):
    cfg = dict(name="shapes", classes=CLASSES, num_per_class=10, image_size=32, seed=0,
               val_split=0.2, test_split=0.1, cache_dir=str(tmp_path / "shapes"))
    cfg.update(kw)
    return NS(**cfg)


def batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_shapes_generation_is_deterministic(tmp_path):
    a = load_dataset(shapes_cfg(tmp_path, cache_dir=str(tmp_path / "a")))
    b = load_dataset(shapes_cfg(tmp_path, cache_dir=str(tmp_path / "b")))
    c = load_dataset(shapes_cfg(tmp_path, cache_dir=str(tmp_path / "c"), seed=1))
    files = lambda d: sorted(d.train.paths + d.val.paths + d.test.paths)  # noqa: E731
    fa, fb, fc = files(a), files(b), files(c)
    assert [Path(p).name for p in fa] == [Path(p).name for p in fb]
    assert all(Path(p).read_bytes() == Path(q).read_bytes() for p, q in zip(fa, fb))
    assert sum(Path(p).read_bytes() != Path(q).read_bytes() for p, q in zip(fa, fc)) == len(fa)
    assert np.array_equal(shapes_mod.render("ring", 3, 32, 5), shapes_mod.render("ring", 3, 32, 5))


def test_shapes_layout_count_and_cache_reuse(tmp_path, capsys):
    cfg = shapes_cfg(tmp_path, num_per_class=5)
    d = load_dataset(cfg)
    assert "generating shapes dataset: 15 images" in capsys.readouterr().err
    root = Path(d.train.paths[0]).parents[1]
    assert root.parent == tmp_path / "shapes"
    for c in CLASSES:
        files = sorted((root / c).iterdir())
        assert [f.name for f in files] == [f"{c}_{i:04d}.png" for i in range(5)]
        with Image.open(files[0]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    mtimes = {p: os.stat(p).st_mtime_ns for p in root.rglob("*.png")}
    d2 = load_dataset(cfg)
    assert "generating" not in capsys.readouterr().err
    assert {p: os.stat(p).st_mtime_ns for p in root.rglob("*.png")} == mtimes
    assert d2.sizes() == d.sizes() and d2.train.paths == d.train.paths
    assert d.class_names == CLASSES  # label order = order in `classes`


def test_shapes_default_cache_dir_uses_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "env"))
    d = load_dataset(shapes_cfg(tmp_path, cache_dir=None, num_per_class=2, val_split=0.5, test_split=0.0))
    assert Path(d.train.paths[0]).is_relative_to(tmp_path / "env" / "shapes")


def test_shapes_interrupted_generation_leaves_no_complete_folder(tmp_path, monkeypatch):
    cfg = shapes_cfg(tmp_path, num_per_class=3)
    real_render, calls = shapes_mod.render, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(shapes_mod, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(cfg)
    assert list((tmp_path / "shapes").iterdir()) == []  # neither final nor temp folder left
    monkeypatch.setattr(shapes_mod, "render", real_render)
    # A folder without manifest (e.g. killed non-atomic writer) is not trusted: regenerated.
    key = shapes_mod.dataset_key(CLASSES, 3, 32, 0)
    (tmp_path / "shapes" / key / "circle").mkdir(parents=True)
    d = load_dataset(cfg)
    assert sum(d.sizes().values()) == 9
    assert (tmp_path / "shapes" / key / shapes_mod.MANIFEST).is_file()


def test_shapes_stratified_split_sizes(tmp_path):
    d = load_dataset(shapes_cfg(tmp_path))
    assert d.sizes() == {"train": 21, "val": 6, "test": 3}
    for part, per_class in ((d.train, 7), (d.val, 2), (d.test, 1)):
        assert np.bincount(np.asarray(part.labels), minlength=3).tolist() == [per_class] * 3
        for path, label in zip(part.paths, part.labels):
            assert Path(path).parent.name == CLASSES[label]
    all_paths = d.train.paths + d.val.paths + d.test.paths
    assert len(set(all_paths)) == 30
    again = load_dataset(shapes_cfg(tmp_path))
    assert again.val.paths == d.val.paths and again.train.paths == d.train.paths
    other = load_dataset(shapes_cfg(tmp_path, seed=3, cache_dir=str(tmp_path / "s3")))
    assert [Path(p).name for p in other.val.paths] != [Path(p).name for p in d.val.paths]


def test_stratified_split_small_classes():
    labels = np.array([0] * 1 + [1] * 2 + [2] * 3 + [3] * 50)
    tr, va, te = stratified_split(labels, 4, 0.2, 0.1, seed=0)
    count = lambda idx: np.bincount(labels[idx], minlength=4).tolist()  # noqa: E731
    assert count(tr)[:3] == [1, 1, 2] and count(va)[:3] == [0, 1, 1] and count(te)[:3] == [0, 0, 0]
    assert count(tr)[3] + count(va)[3] + count(te)[3] == 50 and count(va)[3] == 10 and count(te)[3] == 5
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(labels)))


def test_shapes_pipeline_batch(tmp_path):
    from finetune.data import make_pipeline

    d = load_dataset(shapes_cfg(tmp_path))
    ds = make_pipeline(d, "train", (24, 20), 8, training=True, seed=0, augment="flip")
    x, y = next(iter(ds))
    assert x.shape == (8, 24, 20, 3) and x.dtype.name == "float32" and y.dtype.name == "int32"
    assert 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 255.0 and float(x.numpy().max()) > 1.0
    got = batches(make_pipeline(d, "val", 16, 4, training=False, seed=0, cache="off"))
    labels = np.concatenate([b[1] for b in got])
    assert labels.tolist() == list(d.val.labels) and got[0][0].shape == (4, 16, 16, 3)
    assert sum(len(b[1]) for b in batches(make_pipeline(d, "test", 16, 4, training=False, seed=0))) == 3
    # Training epochs cover every image once, in a different order each epoch.
    ds = make_pipeline(d, "train", 16, 32, training=True, seed=0, cache="memory")
    epochs = [[np.concatenate(part) for part in zip(*batches(ds))] for _ in range(2)]
    fixed_x, fixed_y = (np.concatenate(part) for part in
                        zip(*batches(make_pipeline(d, "train", 16, 32, training=False, seed=0, cache="off"))))
    split = dict(zip((x.tobytes() for x in fixed_x), fixed_y.tolist()))  # image -> label, in file order
    assert len(split) == len(d.train.labels) == 21
    for x, y in epochs:
        assert len(x) == 21 and dict(zip((image.tobytes() for image in x), y.tolist())) == split
    (x1, _), (x2, _) = epochs
    assert not np.array_equal(x1, x2)


def test_shapes_config_errors(tmp_path):
    from finetune.app.checks import check_data
    from finetune.data import make_pipeline

    with pytest.raises(ConfigError, match="data.classes"):
        load_dataset(shapes_cfg(tmp_path, classes=["circle", "sqaure"]))
    with pytest.raises(ConfigError, match="data.classes.*Did you mean 'square'"):
        check_data(shapes_cfg(tmp_path, classes=["circle", "sqaure"]))  # the same check, before any work
    with pytest.raises(ConfigError, match="data.val_split"):
        check_data(shapes_cfg(tmp_path, val_split=1.5))
    d = load_dataset(shapes_cfg(tmp_path))
    with pytest.raises(ConfigError, match="data.cache: received 'disk'; expected one of auto, memory, off"):
        make_pipeline(d, "train", 16, 4, training=True, seed=0, cache="disk")
    with pytest.raises(ConfigError, match="data.name: received 'shape'.*Did you mean 'shapes'"):
        load_dataset(NS(name="shape"))


def test_a_config_without_hydra_gets_the_schemas_defaults(tmp_path):
    """load_dataset(plain config) fills what it leaves out from finetune.config.schema, their one home."""
    from finetune.config.schema import ShapesDataConfig, TfdsDataConfig
    from finetune.data import data_options

    d = load_dataset(NS(name="shapes", cache_dir=str(tmp_path), num_per_class=10))
    assert d.class_names == ShapesDataConfig().classes
    assert d.sizes() == {"train": 42, "val": 12, "test": 6}  # val_split 0.2, test_split 0.1 of 10 per class
    opts = data_options({"name": "tfds", "dataset": "mnist"}, "tfds")
    defaults = TfdsDataConfig()
    assert (opts.train_split, opts.val_split, opts.test_split) == (
        defaults.train_split, defaults.val_split, defaults.test_split)
    assert opts.dataset == "mnist" and opts.cache == "auto"  # keys beyond the schema kept; enums as strings


def test_augmentations_are_a_registry_matching_the_schema(tmp_path):
    """augment= names one entry of finetune.data.augment.POLICIES; flip mirrors images left-right."""
    from finetune.config.schema import AugmentKind
    from finetune.data import POLICIES, make_pipeline

    assert sorted(POLICIES) == sorted(a.value for a in AugmentKind)
    d = load_dataset(shapes_cfg(tmp_path))
    with pytest.raises(ConfigError, match="augment: received 'flp'; expected one of flip, light, none, strong.*'flip'"):
        make_pipeline(d, "train", 16, 4, training=True, seed=0, augment="flp")
    plain = {x.tobytes(): x for b in batches(make_pipeline(d, "train", 16, 32, training=False, seed=0))
             for x in b[0]}
    flipped = [x for b in batches(make_pipeline(d, "train", 16, 32, training=True, seed=0, augment="flip"))
               for x in b[0]]
    assert len(flipped) == len(plain) == 21
    mirrored = [x.tobytes() not in plain for x in flipped]
    assert all(x[:, ::-1].tobytes() in plain for x, m in zip(flipped, mirrored) if m)
    assert 0 < sum(mirrored) < len(flipped)


def test_many_shape_kinds_render():
    assert len(shapes_mod.SUPPORTED_CLASSES) >= 30
    for kind in shapes_mod.SUPPORTED_CLASSES:
        img = shapes_mod.render(kind, 0, 24, 0)
        assert img.shape == (24, 24, 3) and img.dtype == np.uint8


def test_textures_change_the_shape_only_and_keep_untextured_keys():
    """data.textured=true repaints the inside of the shape; background, noise and position are the same
    image for image, and the untextured dataset keeps the key (cache folder) it had before textures."""
    changed = 0
    for i in range(12):
        plain, textured = shapes_mod.render("square", i, 32, 0), shapes_mod.render("square", i, 32, 0, True)
        differs = np.any(plain != textured, axis=-1)
        assert differs.mean() < 0.5  # a square of radius <= 0.4 covers under half the image
        changed += differs.any()
    assert changed >= 9  # "solid" is one texture in five
    assert shapes_mod.dataset_key(["circle", "ring"], 3, 32, 0) == shapes_mod.dataset_key(["circle", "ring"], 3, 32, 0,
                                                                                         False)
    assert shapes_mod.dataset_key(["circle", "ring"], 3, 32, 0) != shapes_mod.dataset_key(["circle", "ring"], 3, 32, 0,
                                                                                         True)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
def test_digits_dataset_and_pipeline():
    from finetune.data import make_pipeline

    d = load_dataset(NS(name="digits", val_split=0.2, test_split=0.1, seed=0))
    assert sum(d.sizes().values()) == 1797 and d.class_names == [str(i) for i in range(10)]
    assert d.train.images.dtype == np.uint8 and d.train.images.max() == 255 and d.train.images.shape[1:] == (8, 8)
    x, y = next(iter(make_pipeline(d, "val", (32, 32), 16, training=False, seed=0)))
    assert x.shape == (16, 32, 32, 3) and x.dtype.name == "float32"
    x = x.numpy()
    assert np.array_equal(x[..., 0], x[..., 1]) and x.max() <= 255.0 and x.max() > 200
    assert y.numpy().tolist() == d.val.labels[:16].tolist()


# ---------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------
def _save(path: Path, mode: str, size=(20, 14), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    rgb.convert(mode).save(path)


def make_folder(root: Path) -> Path:
    _save(root / "cats" / "a.png", "RGB")
    _save(root / "cats" / "b.JPG", "L")
    _save(root / "cats" / "c.bmp", "RGB", size=(33, 9))
    _save(root / "cats" / "nested" / "deeper" / "d.gif", "P")
    _save(root / "dogs" / "e.png", "RGBA")
    _save(root / "dogs" / "f.png", "P")
    _save(root / "dogs" / "g.jpeg", "RGB")
    _save(root / "dogs" / "h.png", "LA")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / ".hidden.png").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("ignored")
    return root


def test_folder_scan_and_decode_all_formats(tmp_path):
    from finetune.data import make_pipeline

    root = make_folder(tmp_path / "imgs")
    found = scan_folder(root)
    assert sorted(found) == ["cats", "dogs"] and len(found["cats"]) == 4 and len(found["dogs"]) == 4
    assert any(p.endswith("d.gif") for p in found["cats"])
    d = load_dataset(NS(name="folder", path=str(root), val_split=0.25, seed=0))
    assert d.name == f"folder:{root.resolve()}" and d.class_names == ["cats", "dogs"] and d.test is None
    assert d.sizes() == {"train": 6, "val": 2, "test": 0}
    for split in ("train", "val"):
        for x, y in batches(make_pipeline(d, split, (12, 12), 8, training=split == "train", seed=0)):
            assert x.shape[1:] == (12, 12, 3) and x.dtype == np.float32
    # val_path / test_path: separate folders with the same classes
    val = tmp_path / "val"
    _save(val / "cats" / "v.png", "RGB")
    _save(val / "dogs" / "w.png", "L")
    d = load_dataset(NS(name="folder", path=str(root), val_path=str(val), test_path=str(val), val_split=0.5))
    assert d.sizes() == {"train": 8, "val": 2, "test": 2} and list(d.val.labels) == [0, 1]


def test_folder_errors(tmp_path):
    def load(path, **kw):
        return load_dataset(NS(name="folder", path=str(path), **kw))

    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"data.path: received '{missing}'; expected an existing folder with one"):
        load(missing)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="data.path.*file.png.*not a folder"):
        load(tmp_path / "file.png")
    flat = tmp_path / "flat"
    _save(flat / "x.png", "RGB")
    with pytest.raises(DataError, match="data.path: .*flat' has no class sub-folders.*1 images directly"):
        load(flat)
    one = tmp_path / "one"
    _save(one / "only" / "x.png", "RGB")
    with pytest.raises(DataError, match="data.path: .*only one class sub-folder.*'only'"):
        load(one)
    empty = tmp_path / "empty"
    _save(empty / "a" / "x.png", "RGB")
    (empty / "b").mkdir()
    (empty / "c").mkdir()
    (empty / "c" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="data.path: class folders without images.*'b', 'c'"):
        load(empty)
    good = make_folder(tmp_path / "good")
    other = tmp_path / "otherval"
    _save(other / "cats" / "x.png", "RGB")
    _save(other / "birds" / "x.png", "RGB")
    with pytest.raises(DataError, match=r"data.val_path: .*missing \['dogs'\].*\['birds'\]"):
        load(good, val_path=str(other))
    with pytest.raises(ConfigError, match="data.path: received None"):
        load_dataset(NS(name="folder", path=None))
    for err in (DataError, ConfigError):
        assert issubclass(err, FinetuneError)


def test_folder_check_does_not_import_tensorflow(tmp_path):
    root = make_folder(tmp_path / "imgs")
    code = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace as NS
        import finetune.data as data
        d = data.load_dataset(NS(name="folder", path={str(root)!r}, val_split=0.25))
        assert d.sizes()["train"] == 6
        d = data.load_dataset(NS(name="digits"))
        d = data.load_dataset(NS(name="shapes", classes=["circle", "cross"], num_per_class=2, image_size=16,
                                 cache_dir={str(tmp_path / "sub")!r}))
        try:
            data.load_dataset(NS(name="folder", path={str(tmp_path / "missing")!r}))
        except Exception as e:
            print(type(e).__name__)
        print("TF" if any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules) else "noTF")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ConfigError", "noTF"]


# ---------------------------------------------------------------------------------------------
# tfds (offline: mock_data, and the no-network error)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,first_class", [("mnist", "0"), ("tf_flowers", "dandelion")])
def test_tfds_mock(dataset, first_class, monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from finetune.data import make_pipeline
    from finetune.data import tfds as tfds_source

    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: True)  # mock's prepare is a no-op
    with tfds.testing.mock_data(num_examples=6):
        d = load_dataset(NS(name="tfds", dataset=dataset, data_dir=str(tmp_path)))
        assert d.class_names[0] == first_class and d.name == f"tfds:{dataset}"
        assert d.train.tfds_split == "train[:80%]" and d.test.tfds_split == "train[90%:]"
        for training in (True, False):
            got = batches(make_pipeline(d, "train", (16, 16), 4, training=training, seed=0, augment="flip"))
            assert got[0][0].shape == (4, 16, 16, 3) and got[0][0].dtype == np.float32
            assert got[0][1].dtype == np.int32 and sum(len(b[1]) for b in got) == 6


def test_tfds_name_forms_and_unknown_name(tmp_path):
    from finetune.data import source_of

    assert source_of(NS(name="tfds", dataset="mnist")) == "tfds"
    assert source_of(NS(name="tfds:mnist")) == "tfds"
    assert source_of(NS(name="mnist", train_split="train")) == "tfds"
    with pytest.raises(ConfigError, match="data.dataset: received 'mnsit'.*Did you mean 'mnist'"):
        load_dataset(NS(name="tfds", dataset="mnsit", data_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.name: received 'mnsit'.*Did you mean 'mnist'"):
        load_dataset(NS(source="tfds", name="mnsit", data_dir=str(tmp_path)))


def test_tfds_hints_name_keys_hydra_accepts():
    """Every fix a tfds error suggests is an override that composes (data.name, never data.dataset), and
    a fraction where tfds wants a split string is refused before anything is read."""
    import re

    from finetune.app.hydra_app import precheck
    from tests.test_config import compose

    message = precheck("train", ["data=tfds", "data.name=tfds"])
    assert message.startswith("data.name: ") and "data.dataset" not in message, message
    (fix,) = re.findall(r"set (data\.\S+=\S+)", message)
    assert compose("data=tfds", fix).data.name == "tf_flowers"
    with pytest.raises(Exception, match="dataset"):
        compose("data=tfds", "data.dataset=tf_flowers")  # the key the old hint named: Hydra refuses it
    assert precheck("train", ["data=tfds", "data.val_split=0.2"]) == (
        "data.val_split: received '0.2'; expected a tfds split string like 'train[80%:90%]' (tfds splits are "
        "strings, not fractions)")


def test_tfds_offline_error_is_fast(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)  # same as a machine without network
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dataset(NS(name="tfds", dataset="tf_flowers", data_dir=str(tmp_path), download=True))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "no network" in msg and "tfds build tf_flowers" in msg and "data.data_dir=DIR" in msg
    assert str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(DataError, match="not prepared.*data.download=false"):
        load_dataset(NS(name="tfds", dataset="tf_flowers", data_dir=str(tmp_path), download=False))


def test_tfds_prepared_dataset_offline(tmp_path):
    """A really prepared dataset (tfds' offline DummyMnist): split sizes, download=false, bad split."""
    pytest.importorskip("importlib_resources")  # tfds' download_and_prepare needs it (etils.epath)
    from tensorflow_datasets.testing import DummyMnist

    from finetune.data import make_pipeline

    DummyMnist(data_dir=str(tmp_path)).download_and_prepare()  # 20 train + 20 test fake examples
    cfg = dict(name="tfds", dataset="dummy_mnist", data_dir=str(tmp_path), download=False,
               train_split="train[:60%]", val_split="train[60%:]", test_split="test")
    d = load_dataset(NS(**cfg))
    assert d.sizes() == {"train": 12, "val": 8, "test": 20} and d.class_names == [str(i) for i in range(10)]
    got = batches(make_pipeline(d, "val", 16, 3, training=False, seed=0))
    assert [len(b[1]) for b in got] == [3, 3, 2] and got[0][0].shape == (3, 16, 16, 3)
    assert np.array_equal(got[0][0][..., 0], got[0][0][..., 2])  # grayscale -> RGB
    with pytest.raises(ConfigError, match="data.train_split: received 'trian'.*train, test"):
        load_dataset(NS(**{**cfg, "train_split": "trian"}))


@pytest.mark.parametrize("mode", ["1", "P", "L", "RGB"])
def test_bmp_files_decode_to_their_rgb_colours(tmp_path, mode):
    """TensorFlow's own BMP decoder fails on 1-bit files and returns palette indices for 8-bit ones."""
    from PIL import Image

    from finetune.data import load_image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    path = tmp_path / f"{mode}.BMP"
    rgb.convert(mode).save(path, format="BMP")
    got = load_image(str(path), (12, 16)).numpy()
    want = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    np.testing.assert_array_equal(got, want)

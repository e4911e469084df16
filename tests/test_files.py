"""Atomic writes: a failed or killed save never leaves a truncated file where a good one is expected."""
from __future__ import annotations

import os

import pytest

from finetune import files


def test_atomic_write_replaces_in_one_step_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    files.write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'

    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')  # a save that fails half way
            assert tmp.parent == target.parent and tmp.name.endswith(".json")
            raise RuntimeError("killed during save")
    assert target.read_text() == '{"a": 1}'  # the old file, whole
    assert sorted(os.listdir(target.parent)) == ["metrics.json"]  # no temp file left behind


def test_a_linked_file_takes_no_second_copy_and_keeps_its_bytes_when_the_source_is_rewritten(tmp_path):
    source = files.write_bytes(tmp_path / "model" / "model.keras", b"trained weights")
    linked = files.link_or_copy(source, tmp_path / "mlflow_model" / "data" / "model.keras")
    assert linked.read_bytes() == b"trained weights"
    assert linked.stat().st_ino == source.stat().st_ino  # one file on disk under two names
    files.write_bytes(source, b"retrained")  # finetune's writes replace by rename, never in place
    assert source.read_bytes() == b"retrained" and linked.read_bytes() == b"trained weights"
    assert sorted(os.listdir(linked.parent)) == ["model.keras"]  # no temp file left behind


def test_keras_files_keep_their_suffix_and_load_back(tmp_path):
    import keras
    import numpy as np

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    files.save_model(model, tmp_path / "model.keras")
    files.save_weights(model, tmp_path / "backbone.weights.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.weights.h5", "model.keras"]
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    other.load_weights(tmp_path / "backbone.weights.h5")
    np.testing.assert_allclose(other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)

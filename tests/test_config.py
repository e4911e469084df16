"""Config composition and validation: every option composes, bad values get one line and exit 2."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra

from finetune.model.backbones import BACKBONES
from finetune.config.paths import conf_dir
from finetune.config.schema import register_configs
from finetune.errors import ConfigError
from finetune.app.hydra_app import precheck
from finetune.app.checks import validate_train

CONF = conf_dir()
GROUPS = ["backbone", "freeze", "head", "data", "optimizer", "trainer", "tracking", "experiment"]


def compose(*overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra.compose("train", overrides=list(overrides))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    extra = ["data.path=/somewhere"] if (group, option) == ("data", "folder") else []
    cfg = compose(f"{group}={option}", *extra)
    if group == "backbone":
        assert cfg.backbone.name == option
    if group == "data":
        assert cfg.data.source == option


def test_backbone_group_lists_every_registered_model():
    assert options("backbone") == sorted(BACKBONES)


def test_compose_and_validate_never_import_tensorflow():
    code = ("import sys; from tests.test_config import compose; from finetune.app.checks import validate_train;"
            "validate_train(compose('backbone=resnet50', 'freeze=last_n', 'freeze.n=2', 'head=mlp'));"
            "from finetune.app.hydra_app import precheck; assert precheck('train', ['backbone=vgg16']) is None;"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=CONF.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("overrides,key", [
    (["backbone=resnet5"], "backbone"),
    (["backbone.pooling=mean"], "backbone.pooling"),
    (["trainer.epoch=3"], "trainer.epoch"),
    (["trainer.epochs=three"], "trainer.epochs"),
    (["freeze=some"], "freeze"),
    (["head.units=12"], "head.units"),
])
def test_composition_errors_are_one_line_naming_the_key(overrides, key):
    message = precheck("train", overrides)
    assert message is not None and "\n" not in message
    assert message.startswith(key), message


@pytest.mark.parametrize("overrides,key", [
    (["backbone=inception_v3", "backbone.input_shape=[64,64]"], "backbone.input_shape"),
    (["backbone=resnet50", "backbone.input_shape=[16,16]"], "backbone.input_shape"),
    (["backbone=vgg16", "backbone.include_top=true", "backbone.input_shape=[64,64]"], "backbone.input_shape"),
    (["backbone=vgg16", "backbone.include_top=true", "backbone.weights=null"], "backbone.include_top"),
    (["backbone=vgg16", "freeze=last_n", "freeze.n=99"], "freeze.n"),
    (["backbone.pooling=null"], "backbone.pooling"),
    (["backbone.weights=/no/such/file.weights.h5"], "backbone.weights"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["data.val_split=0"], "data.val_split"),
    (["experiment=two_stage", "backbone=vgg16", "trainer.stages.1.n=9"], "trainer.stages[1].n"),
])
def test_cross_field_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate_train(compose(*overrides))
    assert info.value.key == key
    assert "\n" not in str(info.value)
    assert "expected" in str(info.value)


@pytest.mark.parametrize("command,overrides", [
    ("classify", ["images=[a.jpg]"]),
    ("extract", ["extract.layer=avg_pool", "extract.format=parquet"]),
    ("predict", ["model=abc", "images=photos/"]),
    ("evaluate", ["model=abc", "data=digits"]),
    ("export", ["model=abc", "export.quantize=int8"]),
    ("compare", ["compare.metric=final_val_loss"]),
])
def test_every_command_config_composes(command, overrides):
    from finetune.cli import COMMANDS

    assert command in COMMANDS
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra.compose(command, overrides=overrides)
    assert cfg is not None
    assert precheck(command, ["bogus_key=1"]).startswith("bogus_key")


def test_a_misspelt_choice_gets_did_you_mean():
    from finetune.app.hydra_app import precheck

    assert precheck("train", ["backbone.pooling=avgg"]) == (
        "backbone.pooling: received 'avgg'; expected one of avg, max (did you mean 'avg'?)")
    assert "(did you mean 'skip'?)" in precheck("train", ["data=folder", "data.path=/tmp", "data.on_bad_file=skp"])


def test_one_cache_base_directory(tmp_path, monkeypatch):
    """$FINETUNE_CACHE_DIR (else ~/.cache/finetune) is worked out in config.paths alone, and every
    store of finetune's lives under it."""
    from finetune.config.paths import cache_dir
    from finetune.data import scan, shapes
    from finetune.features.cache import cache_root
    from finetune.train.checkpoint import index_root

    def stores():
        return [cache_root(), index_root(), shapes.default_cache_dir(), scan.cache_file(str(tmp_path)).parent]

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "c"))
    assert stores() == [tmp_path / "c" / p for p in ("features", "runs", "shapes", "scan")]
    monkeypatch.delenv("FINETUNE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("x") == tmp_path / "home" / ".cache" / "finetune" / "x"
    assert [p.parent for p in stores()] == [tmp_path / "home" / ".cache" / "finetune"] * 4
    readers = [p.relative_to(CONF.parent) for p in (CONF.parent / "finetune").rglob("*.py")
               if "FINETUNE_CACHE_DIR\")" in p.read_text() or "'FINETUNE_CACHE_DIR')" in p.read_text()]
    assert readers == [Path("finetune/config/paths.py")]

"""Config composition and validation: every option composes, bad values get one line and exit 2."""
from __future__ import annotations

import dataclasses
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
    assert options("backbone") == sorted([*BACKBONES, "hub"])  # hub: KerasHub presets (tests/test_hub.py)


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


@pytest.mark.parametrize("command,overrides,expected", [
    # expected: the overrides as they land, and one of the command's own defaults
    ("classify", ["images=[a.jpg]"], {"images": ["a.jpg"], "backbone.include_top": True, "classify.top_k": 5}),
    ("extract", ["extract.layer=avg_pool", "extract.format=parquet"],
     {"extract.layer": "avg_pool", "extract.format": "parquet", "backbone.name": "mobilenet_v2"}),
    ("predict", ["model=abc", "images=photos/"], {"model": "abc", "images": "photos/", "predict.top_k": 3}),
    ("evaluate", ["model=abc", "data=digits"], {"model": "abc", "data.source": "digits", "evaluate.split": "test"}),
    ("export", ["model=abc", "export.quantize=int8"], {"model": "abc", "export.quantize": "int8"}),
    ("compare", ["compare.metric=final_val_loss"], {"compare.metric": "final_val_loss"}),
])
def test_every_command_config_composes(command, overrides, expected):
    from omegaconf import OmegaConf

    from finetune.cli import COMMANDS

    assert command in COMMANDS
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra.compose(command, overrides=overrides)
    got = {key: OmegaConf.select(cfg, key) for key in expected}
    assert {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in got.items()} == expected
    assert precheck(command, ["bogus_key=1"]).startswith("bogus_key")


def test_a_misspelt_choice_gets_did_you_mean():
    from finetune.app.hydra_app import precheck

    assert precheck("train", ["backbone.pooling=avgg"]) == (
        "backbone.pooling: received 'avgg'; expected one of avg, max, token (did you mean 'avg'?)")
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


# -- one home per default: conf/ holds only what differs from the schema --------------------------
def _schema_of(path):
    """The dataclass a conf/ file is checked against, and the keys of the file that are not ours."""
    import hydra_plugins.hydra_submitit_launcher.config as submitit

    from finetune.config import schema

    rel = path.relative_to(CONF)
    group = rel.parts[0] if len(rel.parts) > 1 else None
    commands = {"train": schema.TrainConfig, "classify": schema.ClassifyConfig, "extract": schema.ExtractConfig,
                "predict": schema.PredictConfig, "evaluate": schema.EvaluateConfig, "export": schema.ExportConfig,
                "compare": schema.CompareConfig, "cache": schema.CacheConfig,
                "lr_find": schema.TrainConfig}  # lr_find composes train's config
    if group is None:
        return commands[rel.stem], {"defaults", "hydra"}  # hydra: Hydra's own settings, not our schema
    if group == "data":
        return DATA_SCHEMAS[rel.stem], {"defaults"}
    if group in ("experiment", "hparams_search"):
        return schema.TrainConfig, {"defaults"}
    if rel.parts[:2] == ("hydra", "launcher"):
        return submitit.SlurmQueueConf, {"defaults"}
    return _field_type(schema.TrainConfig, group, None), {"defaults"}


def _field_type(cls, key, data_option):
    import typing

    from finetune.config import schema

    if cls is schema.TrainConfig and key == "hydra":  # hparams_search: hydra.sweeper is our sweeper's schema
        return type("HydraSweeper", (), {"__annotations__": {"sweeper": schema.OptunaSweeperConfig}})
    hint = typing.get_type_hints(cls)[key]
    if key == "data" and hint is typing.Any:
        return DATA_SCHEMAS[data_option]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _default(cls, key):
    from enum import Enum

    from omegaconf import MISSING

    field = {f.name: f for f in dataclasses.fields(cls)}[key] if dataclasses.is_dataclass(cls) else None
    if field is None:
        return MISSING
    value = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else MISSING)
    return value.value if isinstance(value, Enum) else value


def _same_as_schema(node, cls, data_option, prefix=""):
    """Keys of `node` (a conf/ file's content) whose value is the schema's default."""
    import typing

    same = []
    for key, value in node.items():
        key_type = _field_type(cls, key, data_option)
        if isinstance(value, dict) and (dataclasses.is_dataclass(key_type) or hasattr(key_type, "__annotations__")):
            same += _same_as_schema(value, key_type, data_option, f"{prefix}{key}.")
        elif isinstance(value, list) and typing.get_args(key_type) and dataclasses.is_dataclass(
                typing.get_args(key_type)[0]):
            for i, item in enumerate(value):  # e.g. trainer.stages: each entry against StageConfig
                same += _same_as_schema(item, typing.get_args(key_type)[0], data_option, f"{prefix}{key}[{i}].")
        elif value == _default(cls, key) and not (isinstance(value, dict) and not value):
            same.append(f"{prefix}{key}={value!r}")
    return same


DATA_SCHEMAS = {}


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_conf_files_hold_only_what_differs_from_the_schema(path):
    """Every value in conf/ is a group selection (a defaults list) or differs from the schema's default,
    so a default has one home (finetune/config/schema.py) and cannot drift back into two."""
    from omegaconf import OmegaConf

    from finetune.config import schema

    DATA_SCHEMAS.update(shapes=schema.ShapesDataConfig, digits=schema.DigitsDataConfig,
                        folder=schema.FolderDataConfig, tfds=schema.TfdsDataConfig,
                        features=schema.FeaturesDataConfig)
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    cls, not_ours = _schema_of(path)
    if path.parent.name == "hparams_search":
        node = {"hydra": node.get("hydra", {})}
        not_ours = set()
    chosen = [d for d in node.get("defaults", []) if isinstance(d, dict) and "override /data" in d]
    data_option = chosen[0]["override /data"] if chosen else "shapes"
    same = _same_as_schema({k: v for k, v in node.items() if k not in not_ours}, cls, data_option)
    assert not same, f"{path.relative_to(CONF)} repeats the schema's defaults: {', '.join(same)}"


def test_the_defaults_check_catches_a_repeated_default():
    from finetune.config import schema

    DATA_SCHEMAS.update(shapes=schema.ShapesDataConfig)
    repeated = {"n": 2, "batchnorm": "frozen", "name": "last_n"}
    assert _same_as_schema(repeated, schema.FreezeConfig, "shapes") == ["n=2", "batchnorm='frozen'"]
    stages = {"trainer": {"batch_size": 32, "stages": [{"name": "a", "lr_scale": 1.0}]}, "data": {"seed": 0}}
    assert _same_as_schema(stages, schema.TrainConfig, "shapes") == [
        "trainer.batch_size=32", "trainer.stages[0].lr_scale=1.0", "data.seed=0"]


@pytest.mark.parametrize("overrides,n", [(["freeze=last_n"], 2), (["freeze=last_n", "freeze.n=3"], 3)])
def test_freeze_n_has_one_default_also_for_stages(overrides, n):
    """freeze.n is 2 unless set: for freeze=last_n, and for a stage with freeze: last_n and no n."""
    from finetune.train.stages import plan_stages

    cfg = compose(*overrides)
    assert cfg.freeze.n == n
    staged = compose("trainer.stages=[{name: a, epochs: 1, freeze: last_n}]", *overrides[1:])
    assert [(s.policy, s.n) for s in plan_stages(staged)] == [("last_n", n)]


# -- the split rule: one function (finetune.app.checks.check_split), every command --------------------
@pytest.mark.parametrize("val,test,val_path,key", [
    (0.2, 0.1, None, None),
    (0.6, 0.3, None, None),         # 0.8999999999999999
    (0.5, 0.4, None, None),         # 0.9 exactly: 10% of each class still trains
    (0.5, 0.45, None, "data.val_split"),
    (0.0, 0.95, None, "data.val_split"),
    (1.0, 0.0, None, "data.val_split"),
    (-0.1, 0.1, None, "data.val_split"),
    (0.2, 1.0, None, "data.test_split"),
    (True, 0.0, None, "data.val_split"),
    (0.0, 0.1, None, "data.val_split"),
    (0.0, 0.1, "val/", None),       # a separate validation folder: no fraction needed
])
def test_the_split_rule(val, test, val_path, key):
    from finetune.app.checks import check_split

    if key is None:
        check_split(val, test, val_path)
        return
    with pytest.raises(ConfigError) as info:
        check_split(val, test, val_path)
    assert info.value.key == key and "\n" not in str(info.value)


def test_every_command_and_source_applies_the_one_split_rule():
    """The same values get the same one line from train, extract and evaluate, for each source that splits
    (before, train refused val+test >= 0.9 while the data sources let anything < 1 through)."""
    over = ["data.val_split=0.5", "data.test_split=0.45"]
    expected = ("data.val_split: received 0.5; expected val_split + test_split <= 0.9 (test_split=0.45), so "
                "that at least 10% of each class's images train")
    for data in (["data=digits"], ["data=shapes"], ["data=folder", f"data.path={CONF}"]):
        assert precheck("train", [*data, *over]) == expected
        assert precheck("extract", [*data, *over]) == expected
        assert precheck("evaluate", ["model=abc", *data, *over]) == expected
    assert precheck("evaluate", ["model=abc", "data=digits", "data.val_split=0.5", "data.test_split=0.4"]) is None


@pytest.mark.slow
def test_the_split_rule_through_the_cli(cli):
    from tests.conftest import one_error_line

    line = one_error_line(cli("evaluate", "model=abc", "data=digits", "data.val_split=0.5", "data.test_split=0.45"))
    assert line == ("error: data.val_split: received 0.5; expected val_split + test_split <= 0.9 "
                    "(test_split=0.45), so that at least 10% of each class's images train")


@pytest.mark.parametrize("command,overrides,key", [
    ("classify", [], "images"), ("predict", [], "model"), ("predict", ["model=abc"], "images"),
    ("evaluate", [], "model"), ("export", [], "model"),
])
def test_a_missing_required_argument_is_one_line(command, overrides, key):
    """Before: precheck passed and the command died on OmegaConf's MissingMandatoryValue traceback."""
    message = precheck(command, overrides)
    assert message is not None and message.startswith(f"{key}: received '???'; expected ") and "\n" not in message
    assert f"{key}=" in message  # says how to give it

"""Bad input through the real CLI: exit 2, exactly one `error: ...` line (no traceback) naming the key or
file with what was received and what is expected, and no MLflow run in the store (these all fail before
a run starts; test_train_cli covers a failure inside a run). Most fail in the precheck, before Hydra
starts a job or TensorFlow is imported; the rest in the command's checks, still before TensorFlow."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune.config.paths import conf_dir
from tests.conftest import one_error_line

PACKAGE = conf_dir().parent / "finetune"
SMALL = ["backbone=mobilenet_v2", "backbone.input_shape=[32,32]", "backbone.weights=null", "data.num_per_class=4", "data.image_size=32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad weights files and models, made once: tiny Keras backbones (32 px, random weights)."""
    import h5py
    import keras

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "notes.weights.h5").write_text("these are not weights\n")
    with h5py.File(root / "plain.h5", "w") as handle:
        handle.create_dataset("x", data=[1, 2, 3])
    # MobileNetV2 with its classifier, Keras 3 format: Keras itself would load it into the no-top
    # backbone without a word
    keras.applications.MobileNetV2(weights=None, include_top=True, input_shape=(32, 32, 3), alpha=0.35,
                                   classes=3).save_weights(root / "mnv2_top.weights.h5")
    # MobileNetV2 without classifier, legacy Keras 2 .h5 (the format keras.applications downloads)
    keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35,
                                   pooling="avg").save(root / "mnv2_notop.h5")
    keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35,
                                   pooling="avg").save_weights(root / "mnv2_notop.weights.h5")
    keras.applications.MobileNetV3Small(weights=None, include_top=False, input_shape=(32, 32, 3),
                                        pooling="avg").save_weights(root / "mnv3_small.weights.h5")
    # a model with a Lambda layer (Python code in the file), as `finetune train` lays out a model folder
    model_dir = root / "lambda_model"
    model_dir.mkdir()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0, name="scale")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(model_dir / "model.keras")
    (model_dir / "label_map.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "input_shape": [8, 8, 3]}))
    Image.new("RGB", (8, 8)).save(root / "img.png")
    (root / "afile").write_text("a file where a folder is expected")
    (root / "photos" / "cat").mkdir(parents=True)
    return root


# (id, command, arguments ({f}: the files folder, {conf}, {pkg}), words the error line must hold)
CASES = [
    # unknown names, with a suggestion
    ("unknown_backbone", "train", ["backbone=resnet5"], ["backbone", "resnet5", "did you mean 'resnet50'"]),
    ("unknown_option", "train", ["head=mpl"], ["head", "mpl", "did you mean 'mlp'"]),
    ("unknown_key", "train", ["trainer.epoc=3"], ["trainer.epoc", "did you mean 'epochs'"]),
    ("unknown_key_top", "extract", ["extrct.layer=fc1"], ["extrct", "did you mean 'extract'"]),
    ("wrong_type", "train", ["trainer.epochs=three"], ["trainer.epochs", "received 'three'", "an integer"]),
    ("wrong_choice", "train", ["backbone.pooling=mean"], ["backbone.pooling", "mean", "avg"]),
    # imports named by the config
    ("target_os_system", "train", ["+hydra.callbacks.evil._target_=os.system"],
     ["hydra.callbacks.evil._target_", "os.system", "expected"]),
    ("target_reexport", "train", ["+hydra.callbacks.evil._target_=finetune.cli.os.system"],
     ["hydra.callbacks.evil._target_", "finetune.cli.os.system"]),
    ("target_in_sweep", "train", ["-m", "+hydra.callbacks.evil._target_=collections.OrderedDict",
                                  "trainer.epochs=0,1"], ["hydra.callbacks.evil._target_", "collections.OrderedDict"]),
    ("target_config_name_flag", "train", ["-cn", "train", "+hydra.callbacks.evil._target_=collections.OrderedDict"],
     ["hydra.callbacks.evil._target_", "collections.OrderedDict"]),  # no precheck with -cn: Hydra's loader
    # where outputs go
    ("run_dir_under_file", "train", ["hydra.run.dir={f}/afile/run"], ["hydra.run.dir", "afile", "is a file"]),
    ("run_dir_escapes", "train", ["hydra.run.dir=../../escape"], ["hydra.run.dir", "'..'", "working directory"]),
    ("sweep_dir_under_file", "train", ["-m", "hydra.sweep.dir={f}/afile/sweep", "trainer.epochs=0,1"],
     ["hydra.sweep.dir", "is a file"]),
    # a multirun whose config does not compose: its overrides are still checked, then one line, exit 2
    ("sweep_into_package_not_composing", "train", ["-m", "hydra.sweep.dir={pkg}/sweep", "trainer.epoc=1",
                                                   "trainer.epochs=0,1"], ["hydra.sweep.dir", "finetune's own code"]),
    ("target_swept_not_composing", "train", ["-m", "+hydra.callbacks.evil._target_=finetune.cli.main,os.system"],
     ["hydra.callbacks.evil._target_", "'os.system'"]),  # Hydra refuses a sweep over its config, after this
    ("sweep_not_composing", "train", ["-m", "trainer.epoc=1", "trainer.epochs=0,1"],
     ["trainer.epoc", "did you mean 'epochs'"]),
    ("extract_into_conf", "extract", ["extract.output={conf}/features"], ["extract.output", "finetune's own code"]),
    ("predict_into_package", "predict", ["model=x", "images=[a.png]", "predict.output={pkg}/out.csv"],
     ["predict.output", "finetune's own code"]),
    ("export_onto_file", "export", ["model=x", "export.output={f}/afile"], ["export.output", "is a file"]),
    ("outputs_into_dataset", "train", ["data=folder", "data.path={f}/photos", "hydra.run.dir={f}/photos/run"],
     ["hydra.run.dir", "data.path", "read back as data"]),
    ("tracking_store_under_file", "train", ["tracking.uri=sqlite:///{f}/afile/mlflow.db"], ["tracking.uri", "is a file"]),
    ("tracking_file_store", "train", [*SMALL, "tracking.uri=file://{f}/mlruns"],  # MLflow 3 refuses it
     ["tracking.uri", "sqlite:///", "MLFLOW_ALLOW_FILE_STORE=true"]),
    # backbone combinations (command checks, before TensorFlow)
    ("top_with_pooling", "extract", ["backbone.include_top=true", "backbone.weights=null"],
     ["backbone.pooling", "avg", "include_top=true"]),
    ("freeze_n_out_of_range", "train", [*SMALL, "freeze=last_n", "freeze.n=99"], ["freeze.n", "99", "block map"]),
    # weights files (read with h5py / zipfile, before TensorFlow)
    ("weights_missing", "train", [*SMALL, "backbone.weights={f}/nope.weights.h5"],
     ["backbone.weights", "nope.weights.h5", "existing weights file"]),
    ("weights_text_file", "train", [*SMALL, "backbone.weights={f}/notes.weights.h5"],
     ["backbone.weights", "notes.weights.h5", "text file"]),
    ("weights_plain_hdf5", "train", [*SMALL, "backbone.weights={f}/plain.h5"],
     ["backbone.weights", "plain.h5", "without Keras layer weights"]),
    ("weights_with_top", "train", [*SMALL, "backbone.weights={f}/mnv2_top.weights.h5"],
     ["backbone.weights", "mobilenet_v2 include_top=false", "WITH its classifier", "no-top file"]),
    ("weights_other_architecture", "train", ["backbone=vgg16", "backbone.input_shape=[32,32]",
                                             "backbone.weights={f}/mnv2_notop.h5"],
     ["backbone.weights", "vgg16", "looks like MobileNetV2", "104 layers"]),
    ("weights_other_architecture_keras3", "train", [*SMALL, "backbone.weights={f}/mnv3_small.weights.h5"],
     ["backbone.weights", "mobilenet_v2 include_top=false (104 layers", "the file holds 86 layers",
      "another architecture"]),  # Keras' automatic layer names: compared with a skeleton build
    ("weights_without_top", "classify", ["backbone=mobilenet_v2", "backbone.weights={f}/mnv2_notop.h5",
                                          "backbone.input_shape=[32,32]", "images=[{f}/img.png]"],
     ["backbone.weights", "include_top=true", "WITHOUT a classifier"]),
    # a .keras model with code in it, refused in safe mode
    ("model_with_lambda", "predict", ["model={f}/lambda_model/model.keras", "images=[{f}/img.png]"],
     ["model", "Lambda", "'scale'", "safe mode", "model_safe_mode=false"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,command,args,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_no_run(cli, mlflow_client, files, name, command, args, needles):
    values = {"f": files, "conf": conf_dir(), "pkg": PACKAGE}
    result = cli(command, *[a.format(**values) for a in args], experiment=f"bad_{name}", timeout=120)
    line = one_error_line(result)
    assert [n for n in needles if n not in line] == [], line
    assert "expected" in line, line
    exp = mlflow_client.get_experiment_by_name(f"bad_{name}")
    assert exp is None or not mlflow_client.search_runs([exp.experiment_id]), "a run was started"


def test_lambda_model_loads_when_the_user_opts_in(files):
    import numpy as np

    from finetune.errors import ConfigError
    from finetune.model.load import load_model

    path = files / "lambda_model" / "model.keras"
    with pytest.raises(ConfigError, match="model_safe_mode=false"):
        load_model(path)  # Keras' own safe-mode refusal, turned into one line
    probs = load_model(path, safe_mode=False).predict(np.full((1, 8, 8, 3), 255.0, "float32"), verbose=0)
    assert probs.shape == (1, 3)


def test_logging_factories_and_targets_outside_the_allow_list_are_refused():
    from finetune.app.guards import check_targets

    ok = OmegaConf.create({"hydra": {"callbacks": {"m": {"_target_": "finetune.sweep.parent.MlflowSweepCallback"}},
                                     "job_logging": {"handlers": {"h": {"class": "logging.StreamHandler",
                                                                        "stream": "ext://sys.stdout"}}}}})
    assert check_targets(ok) is None
    for bad, key in [
        ({"job_logging": {"formatters": {"f": {"()": "os.system"}}}}, "hydra.job_logging.formatters.f.()"),
        ({"hydra_logging": {"handlers": {"h": {"class": "subprocess.Popen"}}}}, "hydra.hydra_logging.handlers.h.class"),
        ({"job_logging": {"handlers": {"h": {"stream": "ext://os.system"}}}}, "hydra.job_logging.handlers.h.stream"),
        ({"callbacks": {"x": {"_target_": "${oc.env:HOME}"}}}, "hydra.callbacks.x._target_"),
        ({"launcher": {"_target_": "hydra_plugins.x.os.system"}}, "hydra.launcher._target_"),
    ]:
        message = check_targets(OmegaConf.create({"hydra": bad}))
        assert message is not None and message.startswith(key), (bad, message)


def test_every_shipped_config_passes_the_safety_checks():
    from finetune.app.hydra_app import precheck

    required = {"classify": ["images=a.jpg"], "predict": ["model=abc", "images=a.jpg"], "evaluate": ["model=abc"],
                "export": ["model=abc"]}  # the command's own arguments (without them: one line, test_config.py)
    for command in ("train", "classify", "extract", "predict", "evaluate", "export", "compare", "cache"):
        assert precheck(command, required.get(command, [])) is None, command
    for sweep in (["hydra/launcher=joblib"], ["hydra/launcher=submitit_local"], ["hydra/launcher=slurm"],
                  ["hparams_search=head_optuna"], ["optimizer.lr=1e-3,1e-4"]):
        assert precheck("train", ["-m", *sweep]) is None, sweep


def test_a_sweep_is_checked_value_by_value_even_where_it_does_not_compose():
    """A multirun's composed config holds none of its sweep values, and a composition error used to skip
    every check: each value is checked on its own, before composing."""
    from finetune.app.hydra_app import precheck

    not_composing = ["trainer.epoc=1", "trainer.epochs=0,1"]
    for sweep, needles in [
        ([f"hydra.sweep.dir={PACKAGE}/sweep", *not_composing], ["hydra.sweep.dir", "finetune's own code"]),
        (["+hydra.callbacks.evil._target_=finetune.cli.main,os.system"], ["_target_", "'os.system'"]),
        (["+trainer.callbacks._target_=finetune.cli.main,os.system", "trainer.epochs=0,1"], ["'os.system'"]),
        (["extract.output=features,{pkg}/features".format(pkg=PACKAGE), *not_composing], ["extract.output"]),
        (not_composing, ["trainer.epoc", "did you mean 'epochs'"]),
    ]:
        message = precheck("train", ["-m", *sweep])
        assert message and [n for n in needles if n not in message] == [], (sweep, message)


def test_nothing_a_user_loads_later_is_pickled():
    """Every np.load refuses pickles; pickle itself only hands a sweep job's config to its child process
    over a pipe (finetune.sweep.isolated_job: in memory, never a file anyone loads later)."""
    import re

    root = conf_dir().parent
    sources = [p for folder in ("finetune", "hydra_plugins", "scripts") for p in (root / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
        assert "allow_pickle=True" not in text, path
        for use in re.findall(r"(?:pickle|joblib|dill|cloudpickle)\.loads?\(", text):
            assert path.name == "isolated_job.py" and use == "pickle.loads(", (path, use)


@pytest.mark.slow
def test_unwritable_output_folder(cli, mlflow_client, tmp_path):
    """An output folder that cannot be created, for root too (CI runs as root): its parent is a file."""
    (tmp_path / "afile").write_text("a file where a folder is expected")
    line = one_error_line(cli("extract", f"extract.output={tmp_path}/afile/features", experiment="bad_unwritable"))
    assert line.startswith("error: extract.output: received") and "expected a folder finetune can create" in line, line
    assert f"{tmp_path}/afile is a file" in line, line
    assert mlflow_client.get_experiment_by_name("bad_unwritable") is None


def test_the_right_weights_files_pass(files):
    """The checks refuse nothing that Keras loads correctly: the same backbone's no-top weights, in
    Keras 3 and legacy format, pass the CLI's precheck."""
    from finetune.app.hydra_app import precheck

    for name in ("mnv2_notop.weights.h5", "mnv2_notop.h5"):
        args = [*SMALL, f"backbone.weights={files / name}"]
        assert precheck("train", args) is None, name
        assert precheck("extract", args) is None, name

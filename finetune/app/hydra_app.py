"""Running a command as a Hydra app, and turning composition errors into one clear line."""
from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config.paths import conf_dir
from finetune.config.schema import register_configs
from finetune.errors import FinetuneError, did_you_mean
from finetune.app.signals import Terminated, sigterm_raises

# Flags after which composing the config ourselves first would be wrong or pointless.
_NO_PRECHECK = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info", "-sc",
                "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                "--config-dir", "--experimental-rerun"}
_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "--resolve"}
_MULTIRUN = {"-m", "--multirun"}
_TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def overrides_of(args: list[str], multirun: bool = False) -> list[str] | None:
    """The override arguments, or None when the arguments ask for something a precheck can't do
    (`multirun=True`: -m/--multirun is fine, the config is composed as for a sweep)."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if multirun and arg in _MULTIRUN:
            continue
        if arg in _NO_PRECHECK or arg.split("=", 1)[0] in _NO_PRECHECK:
            return None
        if arg in _FLAGS_WITH_VALUE:
            skip = arg != "--resolve"
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides


def precheck(command: str, args: list[str]) -> str | None:
    """Compose the config once; return a one-line message for the first problem, else None.

    Besides composition errors: `_target_`s and logging factories outside finetune.app.guards's
    allow-list, and output paths that are unwritable or outside where finetune may write. A sweep
    (-m) is composed as Hydra composes it for a multirun, which leaves its sweep values out: the
    overrides are checked first, each sweep value on its own, so an unsafe one is refused even where
    the composition fails (which Hydra's own run would then fail on too: one line here instead)."""
    overrides, multirun = overrides_of(args), False
    if overrides is None and _MULTIRUN & set(args):
        overrides, multirun = overrides_of(args, multirun=True), True
    if overrides is None:
        return None
    from finetune.app import guards as safety
    register_configs()
    problem = safety.check_overrides(overrides, multirun=True) if multirun else None
    if problem:
        return problem
    try:
        with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3", job_name=command):
            if multirun:
                from hydra.types import RunMode

                cfg = GlobalHydra.instance().hydra.compose_config(
                    config_name=command, overrides=overrides, run_mode=RunMode.MULTIRUN, from_shell=True)
            else:
                cfg = hydra.compose(config_name=command, overrides=overrides, return_hydra_config=True)
            problem = safety.check_targets(cfg)
            if problem or any(a in ("-c", "--cfg") for a in args):  # --cfg prints the config, runs nothing
                return problem
            problem = safety.check_output_paths(cfg, multirun=multirun)
            if problem or multirun:  # a sweep's jobs check their own values (a bad one: a FAILED child run)
                return problem
            from finetune.app.checks import validate_command

            try:
                validate_command(command, cfg)
            except FinetuneError as error:
                return str(error)
            return None
    except Exception as error:  # noqa: BLE001 - every composition error becomes one line
        return explain_composition_error(error)
    finally:
        GlobalHydra.instance().clear()


def explain_composition_error(error: BaseException) -> str:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or [])
        if group and options:
            return (f"{group}: received {option!r}; expected one of {', '.join(options)}"
                    f"{did_you_mean(option, options)}")
    cause = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _unknown_key(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        first = cause.msg.splitlines()[0]
        wrong_type = re.match(r"Value '(.*)' of type '[\w.]+' could not be converted to (\w+)", first)
        if wrong_type:
            return (f"{cause.full_key}: received {wrong_type.group(1)!r}; expected "
                    f"{_TYPE_NAMES.get(wrong_type.group(2), wrong_type.group(2))}")
        bad_choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
        if bad_choice:  # an enum key (pooling, data.cache, data.on_bad_file, ...)
            options = [o.strip() for o in bad_choice.group(2).split(",") if o.strip()]
            return (f"{cause.full_key}: received {bad_choice.group(1)!r}; expected one of {', '.join(options)}"
                    f"{did_you_mean(bad_choice.group(1), options)}")
        return f"{cause.full_key}: {first}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


# keys that moved: where they are now, said instead of "unknown key"
MOVED_KEYS = {"data.augment": "moved to the augment group: augment=flip (or none, light, strong)"}


def _unknown_key(cause) -> str:
    key = str(cause.key)
    if str(cause.full_key) in MOVED_KEYS:
        return f"{cause.full_key}: {MOVED_KEYS[str(cause.full_key)]}"
    parent, schema = getattr(cause, "parent_node", None), getattr(cause, "object_type", None)
    if isinstance(parent, DictConfig):
        options = list(parent.keys())
    elif dataclasses.is_dataclass(schema):
        options = [f.name for f in dataclasses.fields(schema)]
    else:
        options = []
    expected = f"one of the keys {', '.join(options)}" if options else "a key of the schema"
    return f"{cause.full_key}: unknown key {key!r}{did_you_mean(key, options)}; expected {expected}"


def _task(command: str):
    def task(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        module = importlib.import_module(f"finetune.commands.{command}")
        output_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            if command != "train":  # a sweep job skipped the precheck; train checks inside its run, so a
                from finetune.app.checks import validate_command  # bad combination shows in a sweep

                validate_command(command, cfg)  # as a FAILED child run
            if hydra_cfg.mode == RunMode.MULTIRUN and needs_own_process(command, cfg):
                from finetune.sweep.isolated_job import run_isolated

                result = run_isolated(command, cfg, output_dir)
            else:
                with sigterm_raises():  # every command's MLflow run ends KILLED, never left RUNNING
                    result = module.run(cfg, output_dir)
        except FinetuneError as error:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except Terminated as stop:  # exit 128 + signal, as a shell would
            if not getattr(stop, "run_ended", False):  # else the run scope said how its MLflow run ended
                print(f"finetune {command}: {stop}", file=sys.stderr)
            sys.exit(128 + int(stop.signum))
        except KeyboardInterrupt:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                raise
            sys.exit(130)
        return module.objective(result) if hasattr(module, "objective") else None

    return task


def needs_own_process(command: str, cfg: DictConfig) -> bool:
    """Whether a sweep job runs in a fresh process (trainer.isolate_sweep_jobs): all but the train jobs
    that train a head alone. Those are small and gain most from the sweep's warm process: TensorFlow
    imported, the backbone built, its weights hashed and saved once (finetune.model.backbone_pool)."""
    if not OmegaConf.select(cfg, "trainer.isolate_sweep_jobs"):
        return False
    from finetune.train.head_only import trains_head_only

    return not (command == "train" and trains_head_only(cfg))


def register_plugins() -> None:
    """Make finetune's Optuna sweeper known to Hydra. Hydra finds plugins by walking the hydra_plugins
    namespace, which misses an editable install's (pip install -e) modules; registering is exact."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import FinetuneOptunaSweeper

    Plugins.instance().register(FinetuneOptunaSweeper)


def app_help(command: str, overrides: list[str]) -> str:
    """What Hydra's --help prints (header, config groups, the composed config, footer), in about a
    quarter of its time: Hydra lists each group by copying the whole config store once per group
    (~1.5 s with finetune's schemas); the groups are read here from conf/'s folders."""
    from hydra import compose, initialize_config_dir

    root = conf_dir()
    with initialize_config_dir(config_dir=str(root), version_base="1.3", job_name=command):
        cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
    defaults = OmegaConf.load(root / f"{command}.yaml").get("defaults", [])
    groups = sorted(key for entry in defaults if isinstance(entry, DictConfig) for key in entry
                    if " " not in key and "/" not in key and (root / key).is_dir())
    lines = [f"{g}: {', '.join(sorted(f.stem for f in (root / g).glob('*.yaml')))}" for g in groups]
    hydra_help = cfg.hydra.help
    with open_dict(cfg):
        del cfg["hydra"]
    return (f"{hydra_help.header}\n== Configuration groups ==\n"
            "Compose your configuration from those groups (group=option)\n\n" + "\n".join(lines)
            + "\n\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n"
            + OmegaConf.to_yaml(cfg) + f"\n{hydra_help.footer}")


def run_app(command: str, args: list[str]) -> int:
    register_configs()
    if "--help" in args or "-h" in args:
        try:
            text = app_help(command, [a for a in args if not a.startswith("-")])
        except Exception as error:  # noqa: BLE001 - every composition error becomes one line
            print(f"error: {explain_composition_error(error)}", file=sys.stderr)
            return 2
        print(text)
        return 0
    register_plugins()
    from finetune.app.guards import install_guard

    install_guard()
    sys.argv = [f"finetune {command}", *args]
    app = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(_task(command))
    app()
    return 0

"""Checks that keep a config file or an override from doing harm, run on the composed config before a
command starts (pure Python: no TensorFlow, nothing imported from the targets it checks).

Imports named by a config. Hydra imports and calls every `_target_` of `hydra.callbacks` (and of the
sweeper and launcher), and Python's logging calls the `()` factories and handler `class`es of
`hydra.job_logging` / `hydra.hydra_logging`. A YAML file anyone can edit, or one override
(`+hydra.callbacks.x._target_=os.system`), would run any function. Only these are accepted:
  - `_target_`: a class or function *defined* (not re-exported) in a module under `finetune.`,
    `hydra_plugins.` (installed Hydra launchers/sweepers, finetune's Optuna sweeper) or
    `hydra._internal.core_plugins.` (Hydra's basic sweeper/launcher);
  - logging: classes under `logging.`, `colorlog.` (Hydra's colorlog plugin), `hydra.` or `finetune.`,
    and `ext://sys.stdout` / `ext://sys.stderr` streams.
`FINETUNE_ALLOWED_TARGETS` (colon-separated prefixes, e.g. `mypackage.callbacks.`) extends the list:
an environment variable, which a config file cannot set.

Paths a command writes to. Every output path of a config (hydra.run.dir / hydra.sweep.dir,
extract.output, export.output, predict.output, classify.output, compare.output) is resolved
(`~`, symbolic links, `..`) and must
  - not climb out of the working directory with `..` when it is relative (an absolute path is an
    explicit choice and is accepted);
  - not lie inside finetune's own code or configs (the package, conf/, hydra_plugins/);
  - not lie inside the dataset folders of data=folder (data.path / val_path / test_path): what is
    written there would be read back as images or as a class of its own;
  - be creatable and writable (the nearest existing folder is a folder this user can write), and
    for the tracking store (a sqlite:/// tracking.uri, a local tracking.artifact_location) the same.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

TARGET_PREFIXES = ("finetune.", "hydra_plugins.", "hydra._internal.core_plugins.")
LOGGING_PREFIXES = ("logging.", "colorlog.", "hydra.", "finetune.")
LOGGING_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
ENV_ALLOWED = "FINETUNE_ALLOWED_TARGETS"

# (key, what it names): folders a command creates and writes, and single files it writes
OUTPUT_FOLDERS = ("extract.output", "export.output")
OUTPUT_FILES = ("predict.output", "classify.output", "compare.output")
# other keys the path checks read: the tracking store and data=folder's dataset folders
CHECKED_INPUTS = ("tracking.uri", "tracking.artifact_location", "data.source", "data.path", "data.val_path",
                  "data.test_path")


def _extra_prefixes() -> tuple[str, ...]:
    return tuple(p for p in os.environ.get(ENV_ALLOWED, "").split(":") if p)


# -- imports named by the config ------------------------------------------------------------------
def check_targets(cfg) -> str | None:
    """One line for the first `_target_` / logging factory outside the allow-list, else None."""
    for key, value in _walk(cfg, ""):
        leaf = key.rsplit(".", 1)[-1]
        in_logging = key.startswith(("hydra.job_logging.", "hydra.hydra_logging."))
        if leaf == "_target_":
            if not _target_allowed(str(value)):
                return (f"{key}: received {str(value)!r}; expected a class or function defined under "
                        f"{', '.join(TARGET_PREFIXES + _extra_prefixes())} (config targets are imported "
                        f"and called; allow your own with {ENV_ALLOWED}=<prefix>)")
        elif in_logging and leaf in ("()", "class"):
            if not str(value).startswith(LOGGING_PREFIXES + _extra_prefixes()):
                return (f"{key}: received {str(value)!r}; expected a logging class under "
                        f"{', '.join(LOGGING_PREFIXES)} (logging factories are imported and called)")
        elif in_logging and isinstance(value, str) and value.startswith("ext://") and value not in LOGGING_STREAMS:
            return f"{key}: received {value!r}; expected one of {', '.join(LOGGING_STREAMS)}"
    return None


def _walk(node, prefix: str):
    """(dotted key, value) of every leaf, resolving interpolations where they resolve."""
    if isinstance(node, DictConfig):
        items = [(str(k), k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(str(i), i) for i in range(len(node))]
    else:
        return
    for name, index in items:
        key = f"{prefix}{name}"
        try:
            value = node[index]
        except Exception:  # noqa: BLE001 - missing (???) or an interpolation that does not resolve here
            value = None
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _walk(value, f"{key}.")
        elif value is not None:
            yield key, value


def _target_allowed(target: str) -> bool:
    target = target.strip()
    if target.startswith(_extra_prefixes()) and _extra_prefixes():
        return True
    if not target.startswith(TARGET_PREFIXES):
        return False
    return _defined_in_module(target)


def _defined_in_module(target: str) -> bool:
    """True when `target` is module.path.Name (or module.path.Class.method) with Name a class or function
    defined in that module's source: `finetune.cli.os.system` resolves to os.system through finetune's
    own `import os`, and is refused. Reads the source; imports only the packages on the way."""
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    source, i, package = None, 0, True
    while i < len(parts) and package:  # find_spec imports parent packages only, never a plain module
        try:
            spec = importlib.util.find_spec(".".join(parts[:i + 1]))
        except (ImportError, ValueError, AttributeError):
            spec = None
        if spec is None:
            break
        package = spec.submodule_search_locations is not None
        origin = spec.origin if spec.origin not in (None, "namespace") else None
        source = Path(origin) if origin and origin.endswith(".py") else None
        i += 1
    rest = parts[i:]
    if source is None or not 1 <= len(rest) <= 2:
        return False
    try:
        defined = _definitions(str(source), source.stat().st_mtime_ns)
    except (OSError, SyntaxError, ValueError):
        return False
    if rest[0] not in defined:
        return False
    methods = defined[rest[0]]
    return len(rest) == 1 or (methods is not None and rest[1] in methods)


@functools.lru_cache(maxsize=64)
def _definitions(path: str, mtime_ns: int) -> dict:
    """{name: its method names (a class) or None (a function)} of a module's top level. Cached per file
    version: every job of a sweep checks the same targets (parsing a module took ~10 ms a job)."""
    tree = ast.parse(Path(path).read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {n.name: (frozenset(m.name for m in n.body if isinstance(m, functions))
                     if isinstance(n, ast.ClassDef) else None)
            for n in tree.body if isinstance(n, (ast.ClassDef, *functions))}


def check_overrides(overrides: list[str], multirun: bool = True) -> str | None:
    """The checks above and below on what the command-line overrides themselves set, each value of a
    sweep on its own: a multirun's config holds none of its sweep values (each job composes its own), and
    an unsafe override is refused even where the config does not compose. Only the keys those checks
    read are taken (`_target_`s, logging factories, output paths, the tracking store, dataset folders)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error: composing reports it
        return None
    fixed, swept = {}, []
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or not _checked_key(key):
            continue
        if not override.is_sweep_override():
            fixed[key] = override.value()
        elif override.is_choice_sweep() or override.is_range_sweep():
            try:
                swept += [(key, value) for value in override.sweep_iterator()]
            except Exception:  # noqa: BLE001 - a glob over config files: not a value these checks read
                continue
    for values in [fixed] + [{**fixed, key: value} for key, value in swept]:
        cfg = OmegaConf.create()
        for key, value in values.items():
            try:
                OmegaConf.update(cfg, key, value, force_add=True)
            except Exception:  # noqa: BLE001 - a key under another override's plain value: composing reports it
                continue
        problem = check_targets(cfg) or check_output_paths(cfg, multirun=multirun)
        if problem:
            return problem
    return None


def _checked_key(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return (leaf == "_target_" or key.startswith(("hydra.job_logging", "hydra.hydra_logging"))
            or key in ("hydra.run.dir", "hydra.sweep.dir", *OUTPUT_FOLDERS, *OUTPUT_FILES, *CHECKED_INPUTS))


def install_guard() -> None:
    """Check every config Hydra loads, also where the CLI's precheck does not compose one (-cn, -cp, -cd,
    sweep jobs): one line and exit 2 before Hydra configures logging or instantiates a callback."""
    import sys

    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
    except ImportError:  # another Hydra layout: the precheck still covers the usual command lines
        return
    original = ConfigLoaderImpl.load_configuration
    if getattr(original, "finetune_guard", False):
        return

    @functools.wraps(original)
    def load_configuration(self, *args, **kwargs):
        cfg = original(self, *args, **kwargs)
        problem = check_targets(cfg)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        return cfg

    load_configuration.finetune_guard = True
    ConfigLoaderImpl.load_configuration = load_configuration


# -- paths the command writes -----------------------------------------------------------------------
def protected_folders() -> list[Path]:
    """finetune's code and configs: the package, conf/ and the hydra_plugins it ships."""
    from finetune.config.paths import conf_dir

    package = Path(__file__).resolve().parents[1]
    folders = [package, conf_dir().resolve()]
    plugins = package.parent / "hydra_plugins" / "finetune_optuna_sweeper"
    if plugins.is_dir():
        folders.append(plugins.resolve())
    return folders


def check_output_paths(cfg, multirun: bool = False, cwd: Path | None = None) -> str | None:
    """One line for the first output path of `cfg` that breaks the rules above, else None."""
    cwd = (cwd or Path.cwd()).resolve()
    data_folders = _data_folders(cfg)
    checks = [("hydra.sweep.dir" if multirun else "hydra.run.dir", True)]
    checks += [(key, True) for key in OUTPUT_FOLDERS] + [(key, False) for key in OUTPUT_FILES]
    for key, is_folder in checks:
        value = _select(cfg, key)
        if value in (None, ""):
            continue
        message = check_output_path(key, str(value), is_folder, cwd, data_folders)
        if message:
            return message
    return _check_tracking(cfg)


def check_output_path(key: str, value: str, is_folder: bool, cwd: Path,
                      data_folders: list[tuple[str, Path]] = ()) -> str | None:
    raw = Path(value).expanduser()
    path = (raw if raw.is_absolute() else cwd / raw).resolve()
    if not raw.is_absolute() and not path.is_relative_to(cwd):
        return (f"{key}: received {value!r}; expected a path inside the working directory {cwd} or an "
                f"absolute path (a relative output path may not climb out with '..'; it resolves to {path})")
    for folder in protected_folders():
        if path == folder or path.is_relative_to(folder):
            return (f"{key}: received {value!r}; expected a path outside finetune's own code and configs "
                    f"(it resolves to {path}, inside {folder})")
    for data_key, folder in data_folders:
        if path == folder or path.is_relative_to(folder):
            return (f"{key}: received {value!r}; expected a path outside the dataset folder {data_key}={folder} "
                    "(files written there would be read back as data)")
    if is_folder and path.exists() and not path.is_dir():
        return f"{key}: received {value!r}; expected a folder, but {path} is a file"
    if not is_folder and path.is_dir():
        return f"{key}: received {value!r}; expected a file path, but {path} is a folder"
    return _writable(key, value, path if is_folder else path.parent)


def _writable(key: str, value: str, folder: Path) -> str | None:
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}: received {value!r}; expected a folder finetune can create, but {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        return f"{key}: received {value!r}; expected a folder this user can write ({folder} {what})"
    return None


def _check_tracking(cfg) -> str | None:
    uri = _select(cfg, "tracking.uri")
    if uri and str(uri).startswith("sqlite:///"):
        db = Path(str(uri)[len("sqlite:///"):]).expanduser()
        if db.exists() and not os.access(db, os.W_OK):
            return f"tracking.uri: received {uri!r}; expected an MLflow store this user can write ({db} is read-only)"
        message = _writable("tracking.uri", str(uri), db.parent.resolve())
        if message:
            return message
    location = _select(cfg, "tracking.artifact_location")
    if location and (str(location).startswith("file://") or "://" not in str(location)):
        folder = Path(str(location).removeprefix("file://")).expanduser().resolve()
        return _writable("tracking.artifact_location", str(location), folder)
    return None


def _data_folders(cfg) -> list[tuple[str, Path]]:
    if _select(cfg, "data.source") != "folder":
        return []
    folders = []
    for key in ("data.path", "data.val_path", "data.test_path"):
        value = _select(cfg, key)
        if value not in (None, "", "???"):
            folders.append((key, Path(str(value)).expanduser().resolve()))
    return folders


def _select(cfg, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - a value that does not resolve is checked by its command
        return None

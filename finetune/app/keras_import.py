"""Keras imported without scikit-learn, in finetune's own command processes.

`import keras` imports scikit-learn (and with it SciPy) whenever it is installed, for one module:
`keras.wrappers` (SKLearnClassifier, SKLearnRegressor, SKLearnTransformer). That costs ~0.8 s of every
command's start on 2 cores (`python -c "import keras"`: 5.1-5.3 s, 4.2-4.6 s without it), and finetune
never uses those wrappers; its own metrics are numpy (finetune.train.reports). So the CLI has the
first `import keras` of its process run with scikit-learn hidden: Keras then sees it as not installed
(its wrappers say so if called), and everything after that import finds scikit-learn as usual
(`data=digits` loads its dataset from it). Only the processes `python -m finetune` starts do this;
`import finetune` in a user's own program changes nothing.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys

HIDDEN = "sklearn"


class _Hidden(importlib.abc.MetaPathFinder):
    """Refuses `sklearn` and its submodules, as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == HIDDEN or name.startswith(HIDDEN + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while Keras is imported)", name=name)
        return None


class _KerasLoader(importlib.abc.Loader):
    """keras' own loader, run with scikit-learn hidden."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        hidden = _Hidden()
        sys.meta_path.insert(0, hidden)
        try:
            self.loader.exec_module(module)
        finally:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(hidden)
            module.__loader__ = module.__spec__.loader = self.loader


class _KerasImport(importlib.abc.MetaPathFinder):
    """Finds `keras` once, through the finders after it, and hands it the loader above."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _KerasLoader(spec.loader)
        return spec


def keras_without_sklearn() -> bool:
    """The first `import keras` of this process runs with scikit-learn hidden; True when that is set up
    (False: Keras or scikit-learn is imported already)."""
    if "keras" in sys.modules or HIDDEN in sys.modules:
        return False
    if not any(isinstance(f, _KerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasImport())
    return True

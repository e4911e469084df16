"""Where finetune's Hydra config groups (conf/) are."""
from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """conf/ beside the package in a source checkout, else the copy installed inside the package."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"finetune's conf/ folder is missing (looked beside and inside {package})")

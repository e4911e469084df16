"""Where finetune's files are: its Hydra config groups (conf/) and its cache folder."""
from __future__ import annotations

import os
from pathlib import Path


def conf_dir() -> Path:
    """conf/ beside the package in a source checkout, else the copy installed inside the package."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"finetune's conf/ folder is missing (looked beside and inside {package})")


def cache_dir(*parts: str) -> Path:
    """$FINETUNE_CACHE_DIR/<parts...>, else ~/.cache/finetune/<parts...> (read at each call, so a
    test or a sweep job can point it elsewhere). Nothing is created."""
    root = os.environ.get("FINETUNE_CACHE_DIR")
    base = Path(root).expanduser() if root else Path("~/.cache/finetune").expanduser()
    return base.joinpath(*parts)

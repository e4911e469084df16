"""`finetune cache`: list or clear the feature cache (finetune.features.cache)."""
from __future__ import annotations

import time
from pathlib import Path

from finetune.config.schema import choice
from finetune.errors import ConfigError


def run(cfg, output_dir: Path) -> dict:
    from finetune.features.cache import FeatureCache

    cache, options = FeatureCache(), cfg.cache
    entries = cache.entries()
    if choice(options.action) == "clear":
        if options.key:
            if options.key not in {e.key for e in entries}:
                raise ConfigError("cache.key", options.key, f"a key listed by `finetune cache` (in {cache.root})")
            cache.remove(options.key)
            print(f"removed 1 entry ({options.key}) from {cache.root}")
            return {"removed": 1}
        removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.root}")
        return {"removed": removed}
    print(f"feature cache: {cache.root}")
    if not entries:
        print("  (empty)")
        return {"entries": 0, "bytes": 0}
    print(f"  {'key':<32}  {'MB':>8}  {'last used':<19}  {'backbone':<18} {'data':<28} shape")
    for e in entries:
        d = e.description
        backbone = d.get("backbone", {}).get("name", "?")
        data = f"{d.get('data', {}).get('dataset', '?')}/{d.get('data', {}).get('split', '?')}"
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        print(f"  {e.key:<32}  {e.bytes / 2**20:>8.2f}  {used:<19}  {backbone:<18} {data:<28} {d.get('shape')}")
    total = sum(e.bytes for e in entries)
    print(f"  {len(entries)} entries, {total / 2**20:.1f} MB; clear with: finetune cache cache.action=clear")
    return {"entries": len(entries), "bytes": total}

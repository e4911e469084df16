"""Write conf/backbone/<name>.yaml for every registered backbone (tests check they stay in sync)."""
from pathlib import Path

from finetune.model.backbones import BACKBONES

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"

TEMPLATE = """\
# {constructor} (keras.applications): native input {native}x{native}, minimum {minimum}x{minimum},
# preprocessing '{preprocess}', blocks: {blocks}
name: {name}
weights: imagenet     # imagenet | null | path to a local weights file
input_shape: null     # null = native size; e.g. [128, 128]
include_top: false
pooling: avg          # avg | max | null
"""

if __name__ == "__main__":
    CONF.mkdir(parents=True, exist_ok=True)
    for name, spec in BACKBONES.items():
        (CONF / f"{name}.yaml").write_text(TEMPLATE.format(
            constructor=spec.constructor, native=spec.native_size, minimum=spec.min_size,
            preprocess=spec.preprocess, blocks=" ".join(spec.blocks), name=name))
    print(f"wrote {len(BACKBONES)} files to {CONF}")

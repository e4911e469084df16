"""Write conf/backbone/<name>.yaml for every registered backbone (tests check they stay in sync)."""
from pathlib import Path

from finetune.model.backbones import BACKBONES

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"

TEMPLATE = """\
# {constructor} (keras.applications): native input {native}x{native}, minimum {minimum}x{minimum},
# preprocessing '{preprocess}', blocks: {blocks}
# weights (imagenet | null | a weights file), input_shape (null = native size), include_top and
# pooling (avg | max | null) keep BackboneConfig's defaults (finetune/config/schema.py) unless set
name: {name}
"""

if __name__ == "__main__":
    CONF.mkdir(parents=True, exist_ok=True)
    for name, spec in BACKBONES.items():
        (CONF / f"{name}.yaml").write_text(TEMPLATE.format(
            constructor=spec.constructor, native=spec.native_size, minimum=spec.min_size,
            preprocess=spec.preprocess, blocks=" ".join(spec.blocks), name=name))
    print(f"wrote {len(BACKBONES)} files to {CONF}")

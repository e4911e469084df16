"""What the README states about the code and the suite agrees with the code and scripts/test.sh."""
from __future__ import annotations

import re

from finetune.model.backbones import get_spec
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# the README's names for a family -> a member whose block map it describes
FAMILIES = {"VGG": "vgg16", "ResNet": "resnet50", "Inception V3": "inception_v3", "EfficientNet": "efficientnet_b0",
            "MobileNetV2": "mobilenet_v2", "ConvNeXt": "convnext_tiny"}


def test_block_map_names_in_the_readme_are_the_registry_s():
    listed = dict(re.findall(r"^  - ([\w ]+): (`\w+`…`\w+`)$", README, flags=re.MULTILINE))
    assert set(FAMILIES) <= set(listed), listed
    for family, name in FAMILIES.items():
        blocks = get_spec(name).blocks  # stem, ..., top
        assert listed[family] == f"`{blocks[1]}`…`{blocks[-2]}`", family


def test_readme_and_test_sh_give_the_same_suite_time():
    pattern = r"(\d+(?:\.\d+)?) minutes (?:of test time )?on 2 idle\s+(?:#\s+)?cores"
    readme = re.findall(pattern, README)
    script = re.findall(pattern, (REPO / "scripts" / "test.sh").read_text())
    assert readme and readme == script, (readme, script)

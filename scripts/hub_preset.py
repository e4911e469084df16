"""Write a small KerasHub backbone, built from its config with random weights, as a local preset folder.

    python scripts/hub_preset.py resnet  presets/resnet_small          # then: finetune train backbone=hub
    python scripts/hub_preset.py vit     presets/vit_tiny --size 32    #   backbone.preset=presets/vit_tiny
    python scripts/hub_preset.py --list

Offline, KerasHub's named presets cannot be downloaded; a folder written here is what `backbone=hub` loads
instead (the tests and the transfer demo use it). Each folder holds what `save_to_preset` writes for the
backbone (config.json, model.weights.h5, metadata.json) and for its image converter (image_converter.json:
the pixel scaling the family's real presets use). The configs are small on purpose: they train on 2 CPU
cores at 32-64 px.
"""
from __future__ import annotations

import argparse
import os
import sys


def _resnet(m, size):
    return m.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 96, 128],
                            stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2],
                            block_type="basic_block", image_shape=(None, None, 3))


def _resnet_tiny(m, size):
    return m.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
                            stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2],
                            block_type="basic_block", image_shape=(None, None, 3))


def _vit(m, size):
    return m.ViTBackbone(image_shape=(size, size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                         mlp_dim=32)


def _dinov2(m, size):
    return m.DINOV2Backbone(patch_size=8, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
                            image_shape=(size, size, 3), position_embedding_shape=(size, size, 3))


def _cspnet(m, size):
    return m.CSPNetBackbone(stem_filters=8, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1],
                            stackwise_strides=[1, 2], stackwise_num_filters=[16, 32], block_type="dark_block",
                            stage_type="dark", image_shape=(None, None, 3))


def _densenet(m, size):
    return m.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=(None, None, 3))


def _efficientnet(m, size):
    return m.EfficientNetBackbone(stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 2],
                                  stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
                                  stackwise_expansion_ratios=[1, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
                                  stackwise_strides=[1, 2], stackwise_block_types=["fused", "unfused"],
                                  stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
                                  width_coefficient=1.0, depth_coefficient=1.0)


def _mobilenet(m, size):
    return m.MobileNetBackbone(stackwise_expansion=[[16], [32, 32]], stackwise_num_blocks=[1, 2],
                               stackwise_num_filters=[[8], [16, 16]], stackwise_kernel_size=[[3], [3, 3]],
                               stackwise_num_strides=[[2], [2, 1]], stackwise_se_ratio=[[None], [0.25, 0.25]],
                               stackwise_activation=[["relu"], ["hard_swish", "hard_swish"]],
                               stackwise_padding=[[1], [1, 1]], output_num_filters=32, depthwise_filters=8,
                               depthwise_stride=2, depthwise_residual=False, last_layer_filter=32,
                               squeeze_and_excite=0.5, input_num_filters=8, image_shape=(None, None, 3))


# family -> (build(keras_hub.models, size), converter class, scale, offset): the scaling of the family's presets
FAMILIES = {
    "resnet": (_resnet, "ResNetImageConverter", [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
               [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]),
    "resnet_tiny": (_resnet_tiny, "ResNetImageConverter", 1 / 255.0, None),
    "vit": (_vit, "ViTImageConverter", 1 / 127.5, -1.0),
    "dinov2": (_dinov2, "DINOV2ImageConverter", 1 / 255.0, None),
    "cspnet": (_cspnet, "CSPNetImageConverter", 1 / 255.0, None),
    "densenet": (_densenet, "DenseNetImageConverter", 1 / 255.0, None),
    "efficientnet": (_efficientnet, "EfficientNetImageConverter", 1 / 255.0, None),
    "mobilenet": (_mobilenet, "MobileNetImageConverter", 1 / 127.5, -1.0),
}


def write_preset(family: str, folder, size: int = 32, seed: int = 0) -> str:
    """Build `family` with random weights (seeded) and save it and its image converter to `folder`."""
    import keras
    import keras_hub

    build, converter_class, scale, offset = FAMILIES[family]
    keras.utils.set_random_seed(seed)
    backbone = build(keras_hub.models, size)
    backbone.save_to_preset(str(folder))
    converter = getattr(keras_hub.layers, converter_class)(image_size=(size, size), scale=scale, offset=offset)
    converter.save_to_preset(str(folder))
    return str(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", nargs="?", choices=sorted(FAMILIES))
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--size", type=int, default=32, help="image size of the converter (and of ViT/DINOv2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the families")
    args = parser.parse_args(argv)
    if args.list or not args.family or not args.folder:
        print("families: " + ", ".join(sorted(FAMILIES)))
        return 0 if args.list else 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = write_preset(args.family, args.folder, args.size, args.seed)
    print(f"wrote {args.family} preset to {path}: finetune train backbone=hub backbone.preset={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

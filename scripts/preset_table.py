"""Prints the size table of the DeepMoE presets for docs/presets.md.

    KERAS_BACKEND=jax python scripts/preset_table.py

For every preset: the parameters and dense multiply-adds per image (the
papers' "FLOPs") of the base network (without the embedding network and
gating heads), the figure the papers give where they give one, and the
multiply-adds of the embedding and heads as a share of the base
network's.
"""

import keras

from keras_moe.analysis import flop_report
from keras_moe.models import DEEPMOE_DRN_PRESETS
from keras_moe.models import DEEPMOE_RESNET_PRESETS
from keras_moe.models import DEEPMOE_VGG_PRESETS
from keras_moe.models import DeepMoEDRN
from keras_moe.models import DeepMoEResNet
from keras_moe.models import DeepMoEVGG16

# The papers' figures: (parameters, multiply-adds, source).
PAPER = {
    "resnet20_cifar10": ("0.27 M", "", "He et al., table 6"),
    "resnet56_cifar10": ("0.85 M", "", "He et al., table 6"),
    "resnet110_cifar10": ("1.7 M", "", "He et al., table 6"),
    "resnet18_imagenet": ("11.7 M", "1.8 G", "He et al., table 1"),
    "resnet34_imagenet": ("21.8 M", "3.6 G", "He et al., table 1"),
    "resnet50_imagenet": ("25.6 M", "3.8 G", "He et al., table 1 (1)"),
    "wide_deepmoe_resnet50b_imagenet": (
        "41.9 M (2)",
        "",
        "DeepMoE 5.1: 6% fewer than ResNet-101",
    ),
    "deepmoe_vgg16_w1_high_cifar100": ("24.15 M (3)", "0.351 G", "table 4"),
    "deepmoe_vgg16_w1_mid_cifar100": ("24.16 M (3)", "0.918 G", "table 4"),
    "deepmoe_vgg16_w4_low_cifar100": ("24.18 M (3)", "4.316 G", "table 4"),
    "deepmoe_vgg16_w13_all_cifar100": ("24.18 M (3)", "0.815 G", "table 4"),
    "drn_a50_cityscapes": ("", "703 G (4)", "table 5"),
}


def _size(value, unit):
    scale = {"M": 1e6, "G": 1e9}[unit]
    digits = 3 if value < 10 * scale else 1
    return f"{value / scale:.{digits}f} {unit}"


def rows(cls, presets, **overrides):
    for name in sorted(presets):
        model = cls.from_preset(name, **overrides.get(name, {}))
        report = flop_report(model)
        gating = sum(
            r["dense_macs"]
            for r in report.layers
            if r["type"] in ("ShallowEmbedding", "SparseGatingHeads")
        )
        base = report.dense_macs - gating
        gating_params = sum(
            layer.count_params()
            for layer in model.layers
            if type(layer).__name__ in ("ShallowEmbedding", "SparseGatingHeads")
        )
        params, macs, source = PAPER.get(name, ("", "", ""))
        macs_unit = "G" if base >= 1e9 else "M"
        yield (
            f"| `{name}` | {_size(model.count_params() - gating_params, 'M')}"
            f" | {_size(base, macs_unit)} | {params} | {macs} | {source} | "
            f"{100 * gating / base:.1f}% |"
        )
        keras.utils.clear_session()


def main():
    header = [
        "| preset | parameters | multiply-adds | paper: parameters | "
        "paper: multiply-adds | source | embedding + heads |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    # Table 5 counts DRN-A-50 on whole 1024x2048 Cityscapes frames.
    frames = {
        name: dict(input_shape=(1024, 2048, 3)) for name in DEEPMOE_DRN_PRESETS
    }
    for title, cls, presets, overrides in (
        ("DeepMoEResNet", DeepMoEResNet, DEEPMOE_RESNET_PRESETS, {}),
        ("DeepMoEVGG16", DeepMoEVGG16, DEEPMOE_VGG_PRESETS, {}),
        (
            "DeepMoEDRN (1024x2048 frames)",
            DeepMoEDRN,
            DEEPMOE_DRN_PRESETS,
            frames,
        ),
    ):
        print(f"### {title}\n")
        print("\n".join(header + list(rows(cls, presets, **overrides))))
        print()


if __name__ == "__main__":
    main()

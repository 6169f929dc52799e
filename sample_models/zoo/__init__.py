"""The zoo: compact sample models in the style of well-known architecture families.

Each file defines ``build_model()`` and its example input (``INPUT_SHAPE`` or ``example_inputs()``)
at the size the family is usually run at. ``ZOO`` lists them for the parametrized test and the
benchmarks with a small test input, so the whole zoo runs quickly under every rule. This module
imports nothing heavy (no torch): it is data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
#: Packages some zoo models import as if they were installed (the zoo test puts it on ``sys.path``).
SITE_DIR = ZOO_DIR.parent / "zoo_site"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``spec`` is what to pass as MODEL (``file.py`` or ``file.py:FACTORY``)."""

    name: str
    spec: str
    #: Shapes for ``--input-shape`` in the test (small); None: the file's own (already small) input.
    test_shapes: tuple[tuple[int, ...], ...] | None
    covers: str
    #: How convrewrite must trace it: "fx", "fx+leaves" (with these leaves) or "eager".
    trace: str = "fx"
    leaves: tuple[str, ...] = ()
    #: Imports a package from ``SITE_DIR``, which must be on ``sys.path``.
    needs_site: bool = False
    #: Layers every rule must leave alone, each with a fragment of the reason it must give.
    skipped: tuple[tuple[str, str], ...] = ()
    #: Layers the ``separable`` rule must rewrite (dense KxK convs, whatever their class).
    separable_rewrites: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        file_name, _, factory = self.spec.partition(":")
        return str(ZOO_DIR / file_name) + (f":{factory}" if factory else "")


SMALL_IMAGE = ((1, 3, 32, 32),)

ZOO: tuple[ZooModel, ...] = (
    ZooModel("resnet18", "resnet.py:resnet18", SMALL_IMAGE, "residual, basic blocks, downsampling shortcuts"),
    ZooModel("resnet50", "resnet.py:resnet50", SMALL_IMAGE, "residual, bottleneck blocks, 25.6M params"),
    ZooModel("vgg", "vgg.py", SMALL_IMAGE, "plain 3x3 stack"),
    ZooModel("densenet", "densenet.py", SMALL_IMAGE, "torch.cat of all previous features, ModuleDict block"),
    ZooModel("inception", "inception.py", ((1, 3, 75, 75),), "parallel branches, 1x7 / 7x1 kernels"),
    ZooModel("mobilenetv2", "mobilenetv2.py", SMALL_IMAGE, "inverted residuals, already depthwise"),
    ZooModel("shufflenet", "shufflenet.py", SMALL_IMAGE, "channel split, channel shuffle"),
    ZooModel("unet", "unet.py", ((1, 3, 64, 64),), "ConvTranspose2d upsampling, skip concatenation"),
    ZooModel("deeplab", "deeplab.py", ((1, 3, 64, 64),), "ASPP, dilated convs, F.interpolate"),
    ZooModel("attention", "attention.py", ((1, 3, 64, 64),), "matmul attention and F.scaled_dot_product_attention"),
    ZooModel(
        "untraceable",
        "untraceable.py",
        None,
        "data-dependent control flow in submodules",
        trace="fx+leaves",
        leaves=("gate", "repeat"),
    ),
    ZooModel("untraceable_root", "untraceable_root.py", None, "untraceable root forward", trace="eager"),
    ZooModel("shared_conv", "shared_conv.py", None, "one conv called twice; one conv under two names"),
    ZooModel("tied", "tied.py", None, "tied conv weights; conv tied to a ConvTranspose2d"),
    ZooModel("multi_input", "multi_input.py", None, "two positional inputs (a tuple)"),
    ZooModel("dict_input", "dict_input.py", None, "one dict input, Conv1d and Conv2d"),
    ZooModel("dict_output", "dict_output.py", None, "dict output with a list inside"),
    ZooModel("containers", "containers.py", None, "ModuleList, ModuleDict (non-identifier key), nested Sequential"),
    ZooModel("functional_conv", "functional_conv.py", None, "F.conv2d on a registered parameter"),
    ZooModel(
        "conv3d",
        "conv3d.py",
        ((1, 3, 4, 16, 16),),
        "Conv3d: 3x7x7 stem, (2+1)D, 3x3x3, 1x1x1 around a depthwise 3-D conv",
        skipped=(("depthwise", "already depthwise (groups=64)"),),
        separable_rewrites=("stem.0", "block.0", "block.2", "cube"),
    ),
    ZooModel("padding", "padding.py", None, "padding_mode reflect / circular, padding='same' with even kernels"),
    ZooModel("tdnn", "tdnn.py", ((1, 40, 50),), "TDNN Conv1d stack with dilation, statistics pooling"),
    ZooModel(
        "hybrid_attention",
        "hybrid_attention.py",
        None,
        "conv stem + attention with a bias gathered by an index buffer and cached per device; a leaf after it",
        trace="fx+leaves",
        leaves=("gate",),
    ),
    ZooModel(
        "audio_flags",
        "audio_flags.py",
        None,
        "forward(x, mixup_lambda=None, embed=False): flags traced as their defaults; numpy at import",
    ),
    ZooModel(
        "vit_hybrid",
        "vit_hybrid.py",
        None,
        "conv stem + nn.TransformerEncoder + nn.MultiheadAttention pooling (fused fast paths in eval)",
    ),
    ZooModel(
        "conv_subclasses",
        "conv_subclasses.py",
        None,
        "conv subclasses: TF 'SAME' padding at run time, weight standardization, a conv as a banded linear layer",
        trace="fx+leaves",
        leaves=("stem", "down", "even"),
        skipped=(("band", "its forward is not padding followed by one convolution"),),
        separable_rewrites=("stem", "down", "even", "body.0", "body.2"),
    ),
    ZooModel(
        "custom_op",
        "custom_op.py",
        None,
        "an installed library that registers a torch operator at import (imported again by model.py)",
        trace="fx+leaves",
        leaves=("clip",),
        needs_site=True,
    ),
    ZooModel(
        "crnn",
        "crnn.py",
        ((1, 1, 32, 40),),
        "CRNN: conv stack, then a 2-layer bidirectional batch_first nn.LSTM per column (constructor call in model.py)",
        separable_rewrites=("cnn.2.0", "cnn.4.0"),
    ),
    ZooModel(
        "wrapped_function",
        "wrapped_function.py",
        ((1, 3, 16, 16),),
        "stochastic depth wrapped by torch.fx.wrap (module-level wrap in model.py) on weight-standardized convs",
        separable_rewrites=("stem", "blocks.0.conv", "blocks.1.conv"),
    ),
    ZooModel(
        "private_attribute",
        "private_attribute.py",
        ((1, 3, 16, 16),),
        "a GroupNorm1 with a private cached flag (_fast_norm) inside an untraceable block",
        trace="fx+leaves",
        leaves=("guard",),
        separable_rewrites=("stem", "guard.conv"),
    ),
)


def zoo_model(name: str) -> ZooModel:
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(name)


__all__ = ["SITE_DIR", "ZOO", "ZOO_DIR", "ZooModel", "zoo_model"]

"""The torchvision architectures of the coverage sweep: random weights, small inputs.

Shared by ``tests/test_coverage.py`` and ``benchmarks/coverage.py`` (the table in docs/coverage.md).
Weights are the architectures' own random initializations; batch-norm statistics are then
measured on random batches (as training would have set them), so activations keep their
scale through deep stacks instead of vanishing (GoogLeNet's init shrinks them to ~1e-17 by
the classifier, which no trained model has); a layer initialized to all zeros (ViT's
classifier) gets small random weights, so the outputs compared are not all zero.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# name -> (constructor kwargs, input side); 10 classes keep the heads small.
MODELS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "resnet34": ({}, 64),
    "resnet50": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "efficientnet_v2_s": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "shufflenet_v2_x1_0": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75),
    "mnasnet0_5": ({}, 64),
    "mnasnet1_0": ({}, 64),
    "vgg11_bn": ({}, 64),
    "vgg16": ({}, 64),
    "alexnet": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_b_16": ({"image_size": 32}, 32),
    "vit_b_32": ({"image_size": 64}, 64),
    "swin_t": ({}, 64),
}

# Architectures pqcompile refuses, with the error type and the op the message must name.
REFUSED: dict[str, tuple[str, str]] = {}


def make(name: str, batch: int = 2, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model (eval mode, BN statistics measured) and an example batch."""
    kwargs, side = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # ViT starts its classifier at zero: the output would be 0
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            with torch.no_grad():
                m.weight.normal_(0, 0.02, generator=g)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, 3, side, side, generator=g))
    model.eval()
    return model, (torch.randn(batch, 3, side, side, generator=g),)

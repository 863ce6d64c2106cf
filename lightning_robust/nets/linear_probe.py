"""Transfer learning by fine-tuning only the last layer of a pretrained network (the poisoning papers' setting)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_robust.utils.checkpoint import load_module
from lightning_robust.utils.modules import resolve_layer

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """A pretrained ``net`` whose parameters are all frozen except those of the layer ``head``.

    The clean-label poisoning papers (Shafahi et al. 2018, Zhu et al. 2019) and the Deep k-NN defence (Peri et
    al., arXiv 1909.13374) study this transfer-learning victim: a fixed feature extractor and a linear
    classifier retrained on a small data set that contains the poisons. The frozen body stays in eval mode
    even while the module trains (BatchNorm statistics and dropout of a pretrained extractor are fixed).

    Args:
        net: the network (logits out).
        head: dotted name of the trainable layer, e.g. ``"linear"`` (CIFAR ResNets) or ``"classifier.4"``
            (``SmallCNN``).
        checkpoint: optional weights-only checkpoint (state dict or Lightning checkpoint) loaded into
            ``net`` first.
        reset_head: re-initialise the head (a "cold start" of the last layer) instead of fine-tuning it.

    Raises:
        ValueError: if ``head`` does not exist in ``net``; ``CheckpointError`` for a bad checkpoint.

    Example:
        >>> victim = LinearProbe(SmallCNN(input_size=28), head="classifier.4", checkpoint="clean.ckpt")
        >>> model = Classifier(victim)          # trains only classifier.4
    """

    def __init__(self, net: nn.Module, head: str = "linear", checkpoint: str | None = None,
                 reset_head: bool = False) -> None:
        super().__init__()
        head_module = resolve_layer(net, head)
        if checkpoint is not None:
            net = load_module(checkpoint, into=net)
        if reset_head:
            for m in head_module.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        prefix = head + "."
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(prefix))
        self.net = net
        self.head = head
        self.num_classes = getattr(net, "num_classes", None)
        inner = getattr(net, "feature_layer", None)
        if isinstance(inner, str):
            self.feature_layer = f"net.{inner}"
        self.train()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.net.eval()
        resolve_layer(self.net, self.head).train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

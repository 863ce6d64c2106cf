"""Capture the output of a layer named by a dotted path, with the hook always removed."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from lightning_robust.utils.modules import resolve_layer

__all__ = ["FeatureExtractor"]


class FeatureExtractor:
    """Context manager that records the output of one layer during forward passes.

    The hook is registered on entry and removed on exit, also when the body raises, so a foreign model
    is never left with a stray hook (the contract of captum's hook handling). Inside the block, call the
    model as usual and read :attr:`features`, or call the extractor itself to run the model and return
    the captured output.

    Args:
        module: any ``nn.Module``.
        layer: dotted name of the layer whose output is captured (``module.get_submodule`` syntax).
        detach: detach the captured tensor (default); pass ``False`` to backpropagate through features.
        flatten: flatten the captured tensor to ``[batch, -1]``.

    Raises:
        ValueError: at construction, if ``layer`` does not exist (the message lists valid names).
        RuntimeError: if :attr:`features` is read before any forward pass reached the layer.

    Example:
        >>> net = SmallCNN(input_size=8)
        >>> with FeatureExtractor(net, "classifier.3") as fx:
        ...     logits = net(torch.rand(4, 1, 8, 8))
        ...     feats = fx.features          # [4, 200]
        >>> with FeatureExtractor(net, "classifier.3") as fx:
        ...     feats = fx(torch.rand(4, 1, 8, 8))
    """

    def __init__(self, module: nn.Module, layer: str, detach: bool = True, flatten: bool = True) -> None:
        self.module = module
        self.layer_name = layer
        self.layer = resolve_layer(module, layer)
        self.detach = detach
        self.flatten = flatten
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._features: torch.Tensor | None = None

    def _hook(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out):
            raise TypeError(f"layer {self.layer_name!r} returned {type(out).__name__}, not a tensor")
        if self.detach:
            out = out.detach()
        self._features = out.flatten(1) if self.flatten else out

    def __enter__(self) -> FeatureExtractor:
        if self._handle is not None:
            raise RuntimeError("FeatureExtractor is not re-entrant")
        self._features = None
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def features(self) -> torch.Tensor:
        """Output of the layer in the most recent forward pass."""
        if self._features is None:
            raise RuntimeError(f"no forward pass has reached layer {self.layer_name!r} yet")
        return self._features

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the module on the inputs and return the captured features."""
        entered = self._handle is None
        if entered:
            self.__enter__()
        try:
            self._features = None
            self.module(*args, **kwargs)
            return self.features
        finally:
            if entered:
                self.remove()

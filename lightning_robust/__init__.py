"""lightning_robust: robust and trustworthy deep learning as PyTorch Lightning parts.

Subpackages: ``nets`` (plain nn.Modules), ``attacks``, ``defenses``, ``interpret``, ``certify``, ``ot``
(pure PyTorch), ``metrics`` (torchmetrics), ``models`` (LightningModules), ``callbacks``,
``datamodules`` and ``utils``. See DESIGN.md for the layout and the public API.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

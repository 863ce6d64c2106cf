"""StAdv: spatially transformed adversarial examples (Xiao et al. 2018, arXiv 1801.02612), as used in
ReColorAdv's combined threat models (Laidlaw & Feizi 2019, arXiv 1906.00001).

Each output pixel ``p`` samples the input bilinearly at ``p + f_p``, where ``f`` is a per-pixel flow field
in ``grid_sample``'s normalized coordinates (``-1`` and ``+1`` are the centres of the border pixels, so one
unit is ``(W - 1) / 2`` pixels). The threat model bounds ``|f_p|_∞ <= bound`` (0.05 in the ReColorAdv
code, about 0.8 pixel on 32 x 32 images) and the attack penalizes the flow loss of Xiao et al.,
``Σ_p Σ_{q ∈ N(p)} sqrt(||f_p - f_q||² + eps)``, weighted by ``λ`` (0.05). As in the ReColorAdv code
(mister_ed's ``FullSpatial``), the sampling grid ``p + f_p`` is clipped to ``[-1, 1]`` (inside the image)
and ``grid_sample`` pads with zeros, which the clipped grid never reaches: a pixel at the border that is
pushed outwards samples the border pixel itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_robust.attacks.color_spaces import clip
from lightning_robust.attacks.functional_base import FunctionalAttack, Perturbation, neighbour_smoothness
from lightning_robust.utils.validation import check_non_negative

__all__ = ["StAdv", "apply_flow", "flow_smoothness"]


def _identity_grid(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).unsqueeze(0)  # [1, H, W, 2] as (x, y)


def apply_flow(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp images ``[B, C, H, W]`` by a flow ``[B, 2, H, W]`` (channel 0 horizontal, 1 vertical).

    The sampling grid ``identity + flow`` is clipped to ``[-1, 1]`` and the padding is zeros, as in the
    authors' code; the clip (with gradient 1 on the boundary, :func:`clip`) keeps every sample inside
    the image. The zero flow returns ``x`` up to float rounding of the sampling positions.
    """
    grid = clip(_identity_grid(x) + flow.permute(0, 2, 3, 1), -1.0, 1.0)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def flow_smoothness(flow: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Xiao et al.'s flow loss per sample: ``Σ_p Σ_{q ∈ N(p)} sqrt(||f_p - f_q||² + eps)`` over the four
    axis neighbours, each adjacent pair counted from both sides (border constants left out)."""
    return neighbour_smoothness(flow, (2, 3), eps)


class StAdv(FunctionalAttack, Perturbation):
    """Spatial flow-field attack with an L-inf bound on the flow and Xiao et al.'s smoothness loss.

    Args:
        bound: L-inf bound of the flow in normalized coordinates (ReColorAdv code: 0.05); the sampling
            grid is kept inside ``[-1, 1]`` too.
        smoothness_weight: λ of the flow loss (ReColorAdv code: 0.05).
        steps, lr, optimizer, random_start: the optimizer (default: 100 Adam steps, lr 0.001).
        loss: ``"cw"`` (default) or ``"ce"``.
        keep_best: ``"regularized"`` (authors' code) or ``"success"``; see
            :class:`~lightning_robust.attacks.FunctionalAttack`.
        targeted, model_mode, kappa, low, high: as in :class:`~lightning_robust.attacks.Attack`.

    Raises:
        ValueError: on a negative bound or smoothness weight.

    Example:
        >>> x_adv = StAdv(bound=0.05)(model, x, y)
    """

    def __init__(
        self,
        bound: float = 0.05,
        smoothness_weight: float = 0.05,
        steps: int = 100,
        lr: float = 0.001,
        optimizer: str = "adam",
        random_start: bool = False,
        loss: str = "cw",
        targeted: bool = False,
        model_mode: str = "eval",
        kappa: float = float("inf"),
        low: float = 0.0,
        high: float = 1.0,
        keep_best: str = "regularized",
    ) -> None:
        super().__init__(steps=steps, lr=lr, optimizer=optimizer, random_start=random_start, loss=loss,
                         targeted=targeted, model_mode=model_mode, kappa=kappa, low=low, high=high,
                         keep_best=keep_best)
        self.bound = float(check_non_negative("bound", bound))
        self.smoothness_weight = float(check_non_negative("smoothness_weight", smoothness_weight))

    @property
    def eps(self) -> float:
        return self.bound

    def components(self) -> list[Perturbation]:
        return [self]

    def params_are_null(self) -> bool:
        return self.bound == 0

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().validate(x, y)
        if x.ndim != 4:
            raise ValueError(f"x must be images [B, C, H, W] for StAdv, got shape {tuple(x.shape)}")

    def init_params(self, x: torch.Tensor, random: bool, generator: torch.Generator | None) -> torch.Tensor:
        shape = (x.shape[0], 2, x.shape[-2], x.shape[-1])
        if not random:
            return torch.zeros(shape, device=x.device, dtype=x.dtype)
        u = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self.bound

    def project_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The authors clip the sampling grid to [-1, 1], then bound the flow: both are boxes, so the two
        # clamps in a row are the projection onto their intersection.
        identity = _identity_grid(x).permute(0, 3, 1, 2)  # [1, 2, H, W]
        lower = (-1 - identity).clamp_min(-self.bound)
        upper = (1 - identity).clamp_max(self.bound)
        return torch.minimum(torch.maximum(params, lower), upper)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return clip(apply_flow(x, params), self.threat.low, self.threat.high)

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        return flow_smoothness(params)

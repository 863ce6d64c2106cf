"""ReColorAdv: a functional adversarial attack on image colours (Laidlaw & Feizi 2019, arXiv 1906.00001).

Every pixel's colour ``c`` (in a colour space, CIELUV by default) goes through the same function
``f(c) = c + Δ(c)``, where ``Δ`` is the trilinear interpolation of offsets ``θ`` stored on a regular grid
of control points over the unit colour cube (paper default 16 x 32 x 32 for L x u x v). The threat model
bounds each channel of each offset, ``|θ_{ijk,c}| <= ε_c`` (paper default 0.06), keeps every moved control
point inside the cube, and the attack maximizes the Carlini-Wagner margin minus ``λ`` (0.05) times the
smoothness ``Σ_{neighbours g, h} ||θ_g - θ_h||_2``, with 100 Adam steps at learning rate 0.001.

Because ``Δ`` is a convex combination of offsets, ``|f(c) - c|_c <= ε_c`` holds for every colour, not only
at the control points. Colours outside the cube (a few saturated sRGB colours have u* > 100 or v* < -100)
take the offset of the nearest point of the cube, so the zero grid is the identity for every colour (the
authors' code clamps such colours onto the cube instead, which moves them even at the identity grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_robust.attacks.color_spaces import COLOR_SPACES, clip, color_space
from lightning_robust.attacks.functional import FunctionalAttack, Perturbation, neighbour_smoothness
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int

__all__ = ["ReColorAdv", "apply_color_offsets", "color_grid_smoothness", "grid_node_positions"]


def grid_node_positions(resolution: Sequence[int], device: torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinates of the control points, ``[3, R0, R1, R2]``: node ``(i, j, k)`` sits at
    ``(i / (R0 - 1), j / (R1 - 1), k / (R2 - 1))``."""
    axes = [torch.linspace(0, 1, r, device=device, dtype=dtype) for r in resolution]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)


def apply_color_offsets(c: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``f(c) = c + Δ(c)``: trilinear interpolation of grid offsets at each pixel's colour.

    Args:
        c: colours ``[B, 3, H, W]`` in a colour space scaled to the unit cube.
        offsets: ``θ`` on the grid, ``[B, 3, R0, R1, R2]`` (channel ``k`` of the offset, grid axis ``a``
            indexing colour coordinate ``a``).

    Returns:
        ``[B, 3, H, W]``. Colours outside the cube use the offset at the nearest point of the cube.
    """
    # grid_sample's 5-D grid holds (x, y, z) = (last, middle, first) spatial axis; align_corners=True puts
    # -1 and +1 on the first and last nodes, so colour coordinate t in [0, 1] sits at node t * (R - 1).
    pos = (c.clamp(0.0, 1.0) * 2 - 1).flip(1)  # [B, 3, H, W] -> (coord 2, coord 1, coord 0)
    grid = pos.permute(0, 2, 3, 1).unsqueeze(1)  # [B, 1, H, W, 3]
    delta = F.grid_sample(offsets, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return c + delta.squeeze(2)


def color_grid_smoothness(offsets: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """The paper's smoothness penalty, per sample: ``Σ_g Σ_{h ∈ N(g)} sqrt(||θ_g - θ_h||² + eps)``.

    ``N(g)`` are the (up to six) axis neighbours of node ``g``; each adjacent pair is counted from both
    sides, as in the authors' implementation (the ``eps`` terms of the grid's border are constants and
    are left out).
    """
    return neighbour_smoothness(offsets, (2, 3, 4), eps)


class ReColorAdv(FunctionalAttack, Perturbation):
    """ReColorAdv (arXiv 1906.00001): one smooth, bounded colour function applied to every pixel.

    Args:
        eps: per-channel bound on the grid offsets, one number or one per colour channel, in the colour
            space's unit-cube scale (paper: 0.06 in CIELUV, i.e. 6 units of L* and 12 of u*, v*).
        resolution: control points per colour axis (paper: ``(16, 32, 32)``; each >= 2).
        color_space: ``"cieluv"`` (paper), ``"yuv"`` or ``"rgb"``.
        smoothness_weight: λ of the smoothness penalty (paper: 0.05).
        steps, lr, optimizer, random_start: the optimizer (paper: 100 Adam steps, lr 0.001, no random start).
        loss: ``"cw"`` (paper: Carlini-Wagner margin without a confidence cap) or ``"ce"``.
        targeted, model_mode, kappa, low, high: as in :class:`~lightning_robust.attacks.Attack`.

    Raises:
        ValueError: on a negative bound, a resolution below 2, an unknown colour space, or images without
            exactly three channels (at call time).

    Example:
        >>> attack = ReColorAdv()                      # the paper's settings
        >>> x_adv = attack(model, x, y)                # x: [B, 3, H, W] in [0, 1]
    """

    def __init__(
        self,
        eps: float | Sequence[float] = 0.06,
        resolution: Sequence[int] = (16, 32, 32),
        color_space: str = "cieluv",
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
    ) -> None:
        super().__init__(steps=steps, lr=lr, optimizer=optimizer, random_start=random_start, loss=loss,
                         targeted=targeted, model_mode=model_mode, kappa=kappa, low=low, high=high)
        bounds = [eps] * 3 if isinstance(eps, (int, float)) else list(eps)
        if len(bounds) != 3:
            raise ValueError(f"eps must be one number or three (one per colour channel), got {eps!r}")
        self.eps_channels = tuple(float(check_non_negative("eps", e)) for e in bounds)
        res = list(resolution)
        if len(res) != 3:
            raise ValueError(f"resolution must give three grid sizes, got {resolution!r}")
        self.resolution = tuple(check_positive_int("resolution", r, minimum=2) for r in res)
        self.color_space = check_choice("color_space", color_space, COLOR_SPACES)
        self.smoothness_weight = float(check_non_negative("smoothness_weight", smoothness_weight))

    @property
    def eps(self) -> float:
        return max(self.eps_channels)

    def components(self) -> list[Perturbation]:
        return [self]

    def params_are_null(self) -> bool:
        return max(self.eps_channels) == 0

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().validate(x, y)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be RGB images [B, 3, H, W] for ReColorAdv, got shape {tuple(x.shape)} "
                             "(grey data sets: replicate the channel, e.g. DigitsDataModule(channels=3))")

    # ---- Perturbation interface ---------------------------------------------------------------------
    def _bounds(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.eps_channels, device=like.device, dtype=like.dtype).view(1, 3, 1, 1, 1)

    def init_params(self, x: torch.Tensor, random: bool, generator: torch.Generator | None) -> torch.Tensor:
        shape = (x.shape[0], 3, *self.resolution)
        if not random:
            return torch.zeros(shape, device=x.device, dtype=x.dtype)
        u = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self._bounds(u)

    def _box(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        cache = self.__dict__.setdefault("_box_cache", {})
        if key not in cache:
            nodes = grid_node_positions(self.resolution, like.device, like.dtype).unsqueeze(0)
            bound = self._bounds(like)
            # Moved control points stay in the cube, and each channel's offset within its bound.
            cache.clear()
            cache[key] = ((-nodes).maximum(-bound), (1 - nodes).minimum(bound))
        return cache[key]

    def project_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lower, upper = self._box(params)
        return torch.minimum(torch.maximum(params, lower), upper)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from_rgb, to_rgb = color_space(self.color_space)
        out = to_rgb(apply_color_offsets(from_rgb(x), params))
        return clip(out, self.threat.low, self.threat.high)

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        return color_grid_smoothness(params)

    def __getstate__(self) -> dict:
        # The projection box is a derived cache (possibly on a GPU): rebuild it rather than pickle it.
        return {k: v for k, v in self.__dict__.items() if k != "_box_cache"}

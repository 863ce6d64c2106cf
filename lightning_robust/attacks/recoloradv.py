"""ReColorAdv: a functional adversarial attack on image colours (Laidlaw & Feizi 2019, arXiv 1906.00001).

Every pixel's colour ``c`` (in a colour space, CIELUV by default) goes through the same function
``f(c) = c + Δ(c)``, where ``Δ`` is the trilinear interpolation of offsets ``θ`` stored on a regular grid
of control points over the unit colour cube (paper default 16 x 32 x 32 for L x u x v). The threat model
bounds each channel of each offset, ``|θ_{ijk,c}| <= ε_c`` (paper default 0.06), and the attack maximizes
the Carlini-Wagner margin minus ``λ`` (0.05) times the smoothness ``Σ_{neighbours g, h} ||θ_g - θ_h||_2``,
with 100 Adam steps at learning rate 0.001, returning the iterate with the highest regularized objective.

After every step the control points are projected as in the authors' code (``FullSpatial.project_params``):
each moved point ``n + θ`` is clamped to the cube, sent to sRGB, clipped to the gamut and brought back
(:func:`project_color_grid`), and only then is its offset clamped to the bound. Without the gamut step a
control point may sit on a colour that does not exist, e.g. near black with a large chroma, whose
conversion to RGB is far from anything within the bound (black became bright blue with every offset
within 0.06). ``gamut_projection=False`` keeps the moved points inside the cube instead.

What the result guarantees:

* every offset is within its bound, and since ``Δ`` is a convex combination of offsets,
  ``|f(c) - c|_c <= ε_c`` for every colour, in the colour space's coordinates;
* every control point is the point of its bound's box nearest to an in-gamut colour (the round trip's
  output); where that colour lies inside the box, the control point *is* that colour, so a pixel whose
  colour sits on that node is recoloured to a real colour within the bound;
* the output pixel is ``to_rgb(f(c))``, clipped to the gamut. Where ``f(c)`` lies outside the gamut
  (the bound's clamp pushed a control point back out, or the interpolation between in-gamut points left
  the non-convex gamut), the clip can move the colour somewhat beyond the bound: the guarantee in CIELUV
  is exact for ``f(c)``, not for the clipped pixel.

Colours outside the cube (a few saturated sRGB colours have u* > 100 or v* < -100) take the offset of the
nearest point of the cube. With the gamut projection on, nodes outside the gamut are moved by the
projection even at the zero grid, so the starting function already recolours a few saturated colours
slightly (as in the authors' code); the unprojected zero grid is the identity for every colour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_robust.attacks.color_spaces import COLOR_SPACES, cieluv_gamut_round_trip, clip, color_space
from lightning_robust.attacks.functional_base import FunctionalAttack, Perturbation, neighbour_smoothness
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int

__all__ = ["ReColorAdv", "apply_color_offsets", "color_grid_smoothness", "grid_node_positions",
           "project_color_grid"]


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


def project_color_grid(offsets: torch.Tensor, color_space_name: str, bounds: torch.Tensor) -> torch.Tensor:
    """The authors' projection of the grid offsets (``FullSpatial.project_params`` of the ReColorAdv code).

    Each moved control point ``p = n + θ`` (``n`` its node) is clamped to the unit cube, projected into
    the sRGB gamut by a round trip through RGB, ``p ← from_rgb(clip_[0,1](to_rgb(p)))``, and then its
    offset is clamped per channel to the bound, ``θ ← clamp(p - n, -ε, ε)``.

    The last clamp can move a point out of the gamut again where the gamut is narrower than the bound
    (near black, or at nodes whose box around them holds no sRGB colour at all); then the point is the
    nearest point of the box to an in-gamut colour. What always holds: every offset is within its bound,
    and every control point ``p`` is the box-clamp (the nearest point of the box) of the in-gamut colour
    ``from_rgb(to_rgb(clamp_[0,1](p')))`` of its unprojected position ``p'``.

    Args:
        offsets: ``θ`` ``[B, 3, R0, R1, R2]``.
        color_space_name: the space the grid lives in.
        bounds: per-channel bounds broadcastable to ``offsets`` (``[1, 3, 1, 1, 1]``).
    """
    nodes = grid_node_positions(offsets.shape[2:], offsets.device, offsets.dtype).unsqueeze(0)
    points = (nodes + offsets).clamp_(0.0, 1.0)
    # The conversions work on [B, 3, ...] tensors of any trailing shape, so the grid goes through as is.
    if color_space_name == "cieluv":
        # Every step sends the whole grid (16k points per image at the paper's resolution) through the
        # round trip: the fused one in the grid's own precision is ~4x faster than the two conversions
        # in float32 (~16x than float64) and agrees with them within float32 rounding; the final clamp
        # keeps the bound exact whatever that rounding.
        points = cieluv_gamut_round_trip(points)
    else:
        from_rgb, to_rgb = color_space(color_space_name)
        points = from_rgb(to_rgb(points))
    # One clamp with tensor bounds: the same as minimum(maximum(.)), in one pass over the grid.
    return (points - nodes).clamp_(-bounds, bounds)


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
        gamut_projection: project the moved control points into the sRGB gamut before the bound, as the
            authors' code does (default); ``False`` keeps them inside the unit cube instead.
        keep_best: ``"regularized"`` (authors' code: the iterate with the highest regularized objective)
            or ``"success"`` (a successful iterate over a failed one); see
            :func:`~lightning_robust.attacks.optimize_perturbations`.

    Raises:
        ValueError: on a negative bound, a resolution below 2, an unknown colour space or ``keep_best``
            rule, or images without exactly three channels (at call time).

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
        gamut_projection: bool = True,
        keep_best: str = "regularized",
    ) -> None:
        super().__init__(steps=steps, lr=lr, optimizer=optimizer, random_start=random_start, loss=loss,
                         targeted=targeted, model_mode=model_mode, kappa=kappa, low=low, high=high,
                         keep_best=keep_best)
        self.gamut_projection = bool(gamut_projection)
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
        # The grid is optimized in at least float32: Adam's eps (1e-8) underflows in float16, and offsets
        # of ~1e-3 per step would vanish against bfloat16's resolution; apply() returns the input's dtype.
        dtype = torch.promote_types(x.dtype, torch.float32)
        if not random:
            return torch.zeros(shape, device=x.device, dtype=dtype)
        u = torch.rand(shape, generator=generator, device=x.device, dtype=dtype)
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
        if not self.gamut_projection:
            lower, upper = self._box(params)
            return torch.minimum(torch.maximum(params, lower), upper)
        return project_color_grid(params, self.color_space, self._bounds(params))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from_rgb, to_rgb = color_space(self.color_space)
        out = to_rgb(apply_color_offsets(from_rgb(x).to(params.dtype), params))
        return clip(out, self.threat.low, self.threat.high).to(x.dtype)

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        return color_grid_smoothness(params)

    def __getstate__(self) -> dict:
        # The projection box is a derived cache (possibly on a GPU): rebuild it rather than pickle it.
        return {k: v for k, v in self.__dict__.items() if k != "_box_cache"}

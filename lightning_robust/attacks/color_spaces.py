"""Differentiable colour-space conversions for image tensors ``[B, 3, H, W]`` (sRGB in [0, 1]).

ReColorAdv (arXiv 1906.00001) perturbs colours through a function defined on a colour space; the paper's
best choice is CIELUV, which is close to perceptually uniform, so a bound on the change of each
coordinate bounds the perceived change of colour. Every space here is scaled so that the sRGB gamut lies
in (or, for CIELUV, mostly in) the unit cube, as in the authors' code:

* ``"rgb"``: the identity.
* ``"yuv"``: Y'PbPr of ITU-R BT.601 with the chroma axes shifted by 0.5, ``(Y, Pb + 0.5, Pr + 0.5)``.
* ``"cieluv"``: CIE 1976 L*u*v* under the sRGB (D65) white, stored as ``(L*/100, (u*+100)/200, (v*+100)/200)``.

``to_rgb`` functions clip to the sRGB gamut (the unit cube in linear RGB), so every output is a valid
image. Maths (CIELUV): sRGB gamma -> linear RGB -> ``XYZ = M rgb`` -> ``L* = 116 (Y/Yn)^{1/3} - 16``
(``(29/3)^3 Y/Yn`` below ``(6/29)^3``), ``u* = 13 L* (u' - u'_n)``, ``v* = 13 L* (v' - v'_n)`` with
``u' = 4X / (X + 15Y + 3Z)``, ``v' = 9Y / (X + 15Y + 3Z)``; the white point is ``M 1``, so white maps to
``u* = v* = 0`` exactly. The inverse uses the exact inverse matrix, so round trips are exact up to float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_robust.utils.validation import check_choice, check_finite

__all__ = [
    "COLOR_SPACES",
    "cieluv_gamut_round_trip",
    "cieluv_to_rgb",
    "clip",
    "color_space",
    "linear_to_srgb",
    "rgb_to_cieluv",
    "rgb_to_xyz",
    "rgb_to_yuv",
    "srgb_to_linear",
    "xyz_to_rgb",
    "yuv_to_rgb",
]

# sRGB (IEC 61966-2-1) primaries with the D65 white, linear RGB -> CIE XYZ.
_SRGB_TO_XYZ = torch.tensor([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
], dtype=torch.float64)
_XYZ_TO_SRGB = torch.linalg.inv(_SRGB_TO_XYZ)
_WHITE = _SRGB_TO_XYZ.sum(1)  # XYZ of RGB (1, 1, 1)
_WHITE_DENOM = float(_WHITE[0] + 15 * _WHITE[1] + 3 * _WHITE[2])
_UP_WHITE = float(4 * _WHITE[0]) / _WHITE_DENOM
_VP_WHITE = float(9 * _WHITE[1]) / _WHITE_DENOM
_Y_WHITE = float(_WHITE[1])
_KR, _KG, _KB = 0.299, 0.587, 0.114  # BT.601 luma weights
_TINY = 1e-12


def clip(x: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """``x.clamp(low, high)`` whose gradient is 1 on the closed interval, boundary included.

    ``torch.clamp`` passes no gradient at the boundary itself, so a black or white pixel (most pixels of
    a digit image) would give an attack no gradient at all at the identity; values strictly outside the
    interval get zero gradient, as they should.
    """
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside &= x >= low
    if high is not None:
        inside &= x <= high
    return torch.where(inside, x, x.clamp(low, high))


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bj...->bi...", matrix.to(device=x.device, dtype=x.dtype), x)


def _check(x: torch.Tensor) -> None:
    if x.ndim < 2 or x.shape[1] != 3:
        raise ValueError(f"colour conversions need [B, 3, ...] tensors, got shape {tuple(x.shape)}")


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB gamma: ``c / 12.92`` below 0.04045, ``((c + 0.055) / 1.055)^2.4`` above."""
    # Both branches see safe inputs, so neither produces NaN gradients where it is not selected.
    high = ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(x <= 0.04045, x / 12.92, high)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Apply the sRGB gamma: ``12.92 c`` below 0.0031308, ``1.055 c^(1/2.4) - 0.055`` above."""
    high = 1.055 * x.clamp_min(0.0031308) ** (1 / 2.4) - 0.055
    return torch.where(x <= 0.0031308, 12.92 * x, high)


def rgb_to_xyz(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] to CIE XYZ (D65, ``Y`` of white = 1)."""
    _check(x)
    return _mix(_SRGB_TO_XYZ, srgb_to_linear(x))


def xyz_to_rgb(xyz: torch.Tensor) -> torch.Tensor:
    """CIE XYZ to sRGB, clipped to the gamut in linear RGB."""
    _check(xyz)
    return linear_to_srgb(clip(_mix(_XYZ_TO_SRGB, xyz), 0.0, 1.0))


def _wide(x: torch.Tensor) -> torch.Tensor:
    # The XYZ <-> RGB matrices cancel large terms for saturated colours: in float32 a round trip loses
    # ~1e-5; computing in float64 (cheap next to any network) keeps it near float32 resolution.
    return x.double() if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x


def rgb_to_cieluv(x: torch.Tensor, widen: bool = True) -> torch.Tensor:
    """sRGB to normalized CIELUV ``(L*/100, (u*+100)/200, (v*+100)/200)``.

    ``widen=False`` computes in the input's own precision (about 4x faster in float32, round trips
    within ~2e-5), for bulk work such as projecting colour grids; the default computes in float64.
    """
    check_finite("x", x)
    dtype = x.dtype
    xyz = rgb_to_xyz(_wide(x) if widen else x)
    X, Y, Z = xyz.unbind(1)
    denom = (X + 15 * Y + 3 * Z).clamp_min(_TINY)
    up, vp = 4 * X / denom, 9 * Y / denom
    t = Y / _Y_WHITE
    cube = 116 * t.clamp_min((6 / 29) ** 3) ** (1 / 3) - 16
    L = torch.where(t <= (6 / 29) ** 3, (29 / 3) ** 3 * t, cube)
    u = 13 * L * (up - _UP_WHITE)
    v = 13 * L * (vp - _VP_WHITE)
    return torch.stack([L / 100, (u + 100) / 200, (v + 100) / 200], 1).to(dtype)


def cieluv_to_rgb(luv: torch.Tensor, widen: bool = True) -> torch.Tensor:
    """Normalized CIELUV back to sRGB, clipped to the gamut (out-of-gamut colours map to its surface).

    As in the ReColorAdv code, XYZ is clamped to ``[0, 1.1]`` before the linear map to RGB, and linear
    RGB to ``[0, 1]`` after it. ``widen``: as in :func:`rgb_to_cieluv`.
    """
    check_finite("luv", luv)
    _check(luv)
    dtype = luv.dtype
    luv = _wide(luv) if widen else luv
    L = luv[:, 0] * 100
    u = luv[:, 1] * 200 - 100
    v = luv[:, 2] * 200 - 100
    # L* = 0 is black whatever u*, v* say (Y = 0 below); the clamp only keeps the division finite.
    l13 = (13 * L).clamp_min(_TINY)
    up = u / l13 + _UP_WHITE
    vp = v / l13 + _VP_WHITE
    # v' <= 0 is no colour at all (dark pixels given a large chroma): keep the division finite and let the
    # clip of X, Z at zero below send such colours towards black, as the authors' code does.
    vp4 = torch.where((4 * vp).abs() < _TINY, torch.full_like(vp, _TINY), 4 * vp)
    Y = _Y_WHITE * torch.where(L <= 8, L * (3 / 29) ** 3, ((L.clamp_min(8) + 16) / 116) ** 3)
    X = Y * 9 * up / vp4
    Z = Y * (12 - 3 * up - 20 * vp) / vp4
    # XYZ is clamped to [0, 1.1] as in the authors' code (the white point has Z = 1.089): a dark colour
    # given a large chroma has a tiny v' and would otherwise get an unbounded X or Z.
    return xyz_to_rgb(clip(torch.stack([X, Y, Z], 1), 0.0, 1.1)).to(dtype)


def _mix_planes(matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A 3x3 colour matrix on three separate planes: nine fused multiply-adds, no channel permutes.
    m = matrix.tolist()
    return tuple(  # type: ignore[return-value]
        (a * row[0]).add_(b, alpha=row[1]).add_(c, alpha=row[2]) for row in m
    )


@torch.no_grad()
def cieluv_gamut_round_trip(luv: torch.Tensor) -> torch.Tensor:
    """``rgb_to_cieluv(cieluv_to_rgb(luv))`` in the input's precision, without gradients, in a few passes.

    The same maths as the two conversions (``widen=False``), with two shortcuts that change nothing but
    rounding: the sRGB gamma and its inverse cancel exactly (``srgb_to_linear(linear_to_srgb(l)) = l``
    on ``[0, 1]``, the two branches meeting at ``l = 0.0031308``), so the round trip stays in linear RGB;
    and every step works in place on the three channel planes. ReColorAdv projects its whole colour grid
    through this after every step (16 x 32 x 32 nodes per image), where the two conversions' ~60
    full-size temporaries and four powers per point dominated the attack. The result is closer to the
    float64 round trip than the float32 conversions are, since two powers' rounding is gone.

    Args:
        luv: normalized CIELUV ``[B, 3, ...]`` (not checked for NaN: callers pass their own grids).
    """
    _check(luv)
    L = luv[:, 0] * 100
    l13 = (13 * L).clamp_min_(_TINY)
    up = (luv[:, 1] * 200 - 100).div_(l13).add_(_UP_WHITE)
    vp = (luv[:, 2] * 200 - 100).div_(l13).add_(_VP_WHITE)
    del l13
    vp4 = 4 * vp
    vp4.masked_fill_(vp4.abs() < _TINY, _TINY)
    # Y: the cube branch everywhere, then the linear branch where L <= 8.
    Y = ((L.clamp_min(8) + 16) / 116).pow_(3)
    Y = torch.where(L <= 8, L * (3 / 29) ** 3, Y).mul_(_Y_WHITE)
    X = (9 * up).mul_(Y).div_(vp4)
    Z = (12 - 3 * up).sub_(20 * vp).mul_(Y).div_(vp4)
    del up, vp, vp4, L
    X, Y, Z = _mix_planes(_XYZ_TO_SRGB, X.clamp_(0.0, 1.1), Y.clamp_(0.0, 1.1), Z.clamp_(0.0, 1.1))
    X, Y, Z = _mix_planes(_SRGB_TO_XYZ, X.clamp_(0.0, 1.0), Y.clamp_(0.0, 1.0), Z.clamp_(0.0, 1.0))
    denom = (X + 15 * Y).add_(3 * Z).clamp_min_(_TINY)
    up = (4 * X).div_(denom).sub_(_UP_WHITE)
    vp = (9 * Y).div_(denom).sub_(_VP_WHITE)
    t = Y / _Y_WHITE
    L = torch.where(t <= (6 / 29) ** 3, (29 / 3) ** 3 * t, t.clamp_min((6 / 29) ** 3).pow_(1 / 3).mul_(116).sub_(16))
    out = torch.empty_like(luv)
    torch.div(L, 100, out=out[:, 0])
    out[:, 1] = up.mul_(13).mul_(L).add_(100).div_(200)
    out[:, 2] = vp.mul_(13).mul_(L).add_(100).div_(200)
    return out


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    """sRGB to BT.601 ``(Y, Pb + 0.5, Pr + 0.5)``, all in [0, 1] for colours in the gamut."""
    check_finite("x", x)
    _check(x)
    r, g, b = x.unbind(1)
    y = _KR * r + _KG * g + _KB * b
    pb = (b - y) / (2 * (1 - _KB))
    pr = (r - y) / (2 * (1 - _KR))
    return torch.stack([y, pb + 0.5, pr + 0.5], 1)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    """BT.601 ``(Y, Pb + 0.5, Pr + 0.5)`` back to sRGB, clipped to [0, 1]."""
    check_finite("yuv", yuv)
    _check(yuv)
    y, pb, pr = yuv.unbind(1)
    b = (pb - 0.5) * 2 * (1 - _KB) + y
    r = (pr - 0.5) * 2 * (1 - _KR) + y
    g = (y - _KR * r - _KB * b) / _KG
    return clip(torch.stack([r, g, b], 1), 0.0, 1.0)


def _rgb_identity(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return x


def _rgb_clip(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return clip(x, 0.0, 1.0)


Conversion = Callable[[torch.Tensor], torch.Tensor]

COLOR_SPACES: dict[str, tuple[Conversion, Conversion]] = {
    "cieluv": (rgb_to_cieluv, cieluv_to_rgb),
    "rgb": (_rgb_identity, _rgb_clip),
    "yuv": (rgb_to_yuv, yuv_to_rgb),
}


def color_space(name: str) -> tuple[Conversion, Conversion]:
    """``(from_rgb, to_rgb)`` of a named space (``"cieluv"``, ``"rgb"`` or ``"yuv"``).

    Raises:
        ValueError: on an unknown name.
    """
    check_choice("color_space", name, COLOR_SPACES)
    return COLOR_SPACES[name]

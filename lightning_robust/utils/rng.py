"""Keyed random streams: a ``torch.Generator`` seeded from a string key, with no state to checkpoint."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["keyed_generator"]


def keyed_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a 63-bit BLAKE2b hash of ``key``.

    Modules key their per-step noise by ``"seed/step/rank/stream"``: the stream is then a pure function of
    the step counter (a buffer in the checkpoint), so a resumed run draws exactly what the uninterrupted
    one drew, and ranks draw distinct noise without any RNG state being saved.

    Example:
        >>> g = keyed_generator("0/12/1/latent")
        >>> torch.randn(3, generator=g)  # the same three numbers for this key, on every run
    """
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1))
    return g

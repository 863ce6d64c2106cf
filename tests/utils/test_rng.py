import hashlib

import torch

from lightning_robust.utils import keyed_generator


def test_a_key_fixes_the_stream_and_other_keys_give_other_streams():
    draws = {key: torch.randn(8, generator=keyed_generator(key)) for key in ("0/0/0/latent", "0/0/1/latent",
                                                                             "0/1/0/latent", "1/0/0/latent")}
    assert torch.equal(torch.randn(8, generator=keyed_generator("0/0/0/latent")), draws["0/0/0/latent"])
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_seed_is_the_documented_63_bit_blake2b_of_the_key():
    key = "3/17/1/gp"
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    assert keyed_generator(key).initial_seed() == seed

import numpy as np
import pytest
import torch

from model.noise import gaussian, philox4x32, philox4x32_numpy


def _w(v):
    return torch.tensor([v], dtype=torch.int64)


def test_philox_known_answers():
    # Known-answer vectors of Random123's philox4x32_10.
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, expected in cases:
        out = philox4x32([_w(c) for c in ctr], [_w(k) for k in key])
        assert [int(o) for o in out] == expected


def test_numpy_philox_gives_the_torch_words():
    """The CPU path (NumPy uint64) and the device path (torch int64) give the same words, known answers included."""
    for ctr, key, expected in [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
                               ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD])]:
        out = philox4x32_numpy([np.array([c], dtype=np.uint64) for c in ctr], [np.array([k]) for k in key])
        assert [int(o[0]) for o in out] == expected
    g = torch.Generator().manual_seed(0)
    words = [torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64) for _ in range(6)]
    words[0][:2] = torch.tensor([0, 2**32 - 1])  # the edges of the word range
    ref = philox4x32(words[:4], words[4:])
    out = philox4x32_numpy([w.numpy().astype(np.uint64) for w in words[:4]], [w.numpy() for w in words[4:]])
    for r, o in zip(ref, out):
        assert np.array_equal(r.numpy(), o.astype(np.int64))


def test_gaussian_statistics():
    z = gaussian(torch.arange(64), torch.zeros(64, dtype=torch.int64), (3, 16, 16)).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n**0.5
    assert abs(z.var().item() - 1) < 0.03
    assert abs(((z**4).mean().item()) - 3) < 0.15  # Gaussian kurtosis
    # neighbouring elements, neighbouring seeds and neighbouring noise indices are uncorrelated
    flat = z.reshape(64, -1)
    assert abs((flat[:, 1:] * flat[:, :-1]).mean().item()) < 0.02
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 0.02
    z2 = gaussian(torch.arange(64), torch.ones(64, dtype=torch.int64), (3, 16, 16)).double().reshape(64, -1)
    assert abs((flat * z2).mean().item()) < 0.02


def test_the_whole_63_bit_seed_is_used():
    """Seeds s and s + 2^32 (and s + 2^62) differ: the key's high word is not dropped."""
    shape = (3, 4, 4)
    zero = torch.zeros(3, dtype=torch.int64)
    z = gaussian(torch.tensor([5, 5 + 2**32, 5 + 2**62]), zero, shape)
    assert not torch.allclose(z[0], z[1]) and not torch.allclose(z[0], z[2]) and not torch.allclose(z[1], z[2])


def test_row_depends_only_on_its_seed_and_index():
    alone = gaussian(torch.tensor([9]), torch.tensor([3]), (3, 8, 8))
    batch = gaussian(torch.tensor([1, 9, 2**63 - 1]), torch.tensor([0, 3, 7]), (3, 8, 8))
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1])
    big_seed = gaussian(torch.tensor([2**63 - 1]), torch.tensor([7]), (3, 8, 8))
    assert torch.equal(big_seed[0], batch[2])
    assert torch.isfinite(batch).all()


def test_image_seeds_is_the_one_rule_for_a_requests_images():
    from model.noise import SEED_LIMIT, image_seeds

    assert image_seeds(7, 3) == [7, 8, 9]
    assert image_seeds(SEED_LIMIT - 2, 2) == [SEED_LIMIT - 2, SEED_LIMIT - 1]
    for seed, n in ((-1, 1), (SEED_LIMIT - 1, 2), (0, 0)):
        with pytest.raises(ValueError):
            image_seeds(seed, n)


SEEDS = [0, 5, 2**32 - 1, 2**32 + 5, 2**62 + 5, 2**63 - 1]  # both key words: low only, high only, both, the top
INDICES = [0, 1, 2**31, 2**32 - 1]  # x_T, the first z, RePaint's first known-pixel noise, the last index


def test_the_gpus_philox_path_gives_the_cpus_bits_on_a_cpu():
    """gaussian() runs Philox's rounds in NumPy on CPU tensors and in torch's int64 ops on any other device (every
    image a GPU host makes). Run that torch path on the CPU: the same bits, every seed x index pair, for a shape
    whose element count (3 x 5 x 7 = 105) is not a multiple of the four words a counter gives."""
    seeds = torch.tensor([s for s in SEEDS for _ in INDICES])
    index = torch.tensor(INDICES * len(SEEDS))
    for shape in ((3, 5, 7), (3, 8, 8), (1,)):
        on_cpu = gaussian(seeds, index, shape)
        gpu_path = gaussian(seeds, index, shape, philox_ops="torch")
        assert on_cpu.shape == gpu_path.shape == (len(seeds), *shape)
        assert torch.equal(on_cpu.view(torch.int32), gpu_path.view(torch.int32)), shape  # bit for bit
    assert gaussian(seeds, index, (3, 5, 7), philox_ops="numpy").equal(gaussian(seeds, index, (3, 5, 7)))
    # and the pairs differ from each other: no key word or counter word is dropped on either path
    rows = gaussian(seeds, index, (3, 5, 7), philox_ops="torch").reshape(len(seeds), -1)
    assert len({tuple(r.tolist()) for r in rows}) == len(seeds)
    with pytest.raises(ValueError, match="philox_ops"):
        gaussian(seeds, index, (3,), philox_ops="cuda")

"""The reference Philox against Triton's own generator and the published Philox4x32-10 vectors."""

import numpy as np
import pytest
import torch

from vaebm.ops import philox4x32, philox_normal, philox_uniform
from vaebm.ops.philox import philox_normal_rows


def test_known_answer_vectors():
    # Random123 kat_vectors for philox4x32_10 (Salmon et al., 2011)
    out = philox4x32(0, 0, 0, 0, 0)
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ff = 0xFFFFFFFF
    out = philox4x32(ff, ff, ff, ff, ff | (ff << 32))
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    out = philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822 | (0x299F31D0 << 32))
    assert [int(o) for o in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_matches_triton_randint_and_randn():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def k(out_n, out_i, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_n + offs, tl.randn(seed, offs))
        r0, _, _, _ = tl.randint4x(seed, offs)
        tl.store(out_i + offs, r0.to(tl.int64) & 0xFFFFFFFF)

    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, seed = 2048, 0x1234_5678_9ABC
    n = torch.empty(N, device=dev)
    i = torch.empty(N, dtype=torch.int64, device=dev)
    k[(1,)](n, i, seed, N=N)
    offs = torch.arange(N, device=dev)
    r0, _, _, _ = philox4x32(offs, 0, 0, 0, seed)
    assert torch.equal(r0, i)
    # tl.randn(seed, o) is lane 0 of counter (o, 0, 0, 0): our element 4*o of sample 0, step 0
    ref = philox_normal(seed, 0, 0, 4 * offs)
    torch.testing.assert_close(n, ref, rtol=0, atol=1e-6)


def test_normals_are_standard_normal():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = philox_normal(7, 3, torch.arange(64).unsqueeze(1), torch.arange(4096).unsqueeze(0))
    z = z.flatten().double().numpy()
    assert scipy_stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 0.02


def test_streams_and_counters_are_distinct():
    e = torch.arange(1024)
    base = philox_normal(1, 0, 0, e)
    for other in (philox_normal(2, 0, 0, e), philox_normal(1, 1, 0, e), philox_normal(1, 0, 1, e),
                  philox_normal(1, 0, 0, e, tensor=1), philox_normal(1, 0, 0, e, stream=2)):
        assert np.corrcoef(base.numpy(), other.numpy())[0, 1] < 0.15
        assert not torch.equal(base, other)


def test_uniform_range_and_seed_check():
    u = philox_uniform(5, 0, torch.arange(100000))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="seed"):
        philox_normal(-1, 0, 0, 0)


def test_rows_helper_equals_elementwise():
    samples = torch.tensor([0, 5, 2**32 - 1])
    rows = philox_normal_rows(3, 7, samples, 13, tensor=4, stream=2)
    elem = philox_normal(3, 7, samples[:, None], torch.arange(13)[None], tensor=4, stream=2)
    assert torch.equal(rows, elem)


def test_cpp_accept_uniforms_equal_the_reference_bit_for_bit():
    """vaebm::philox_uniform (MALA's accept test on the cpp backend) against
    philox.philox_uniform on fresh sample ids, steps and 64-bit seeds; opcheck on its schema."""
    from vaebm.ops import _registry
    from vaebm.ops.philox import STREAM_ACCEPT, STREAM_RESET, philox_uniform
    try:
        _registry.load_extension("cpu")
    except _registry.BackendUnavailable as e:
        pytest.skip(str(e))
    op = torch.ops.vaebm.philox_uniform
    gen = torch.Generator().manual_seed(31)
    for trial in range(4):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * (3 if trial % 2 else 1)
        samples = torch.randint(0, 2**32, (257,), generator=gen)
        step = torch.randint(0, 2**31, (1,), generator=gen)
        for stream in (STREAM_ACCEPT, STREAM_RESET):
            got = op(samples, step, seed & 0xFFFFFFFF, seed >> 32, stream)
            want = philox_uniform(seed, step, samples, stream)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert ((got >= 0) & (got < 1)).all()
    torch.library.opcheck(op, (samples, step, 5, 7, STREAM_ACCEPT))

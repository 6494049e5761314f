"""The compact-state codecs (fastopt/backends/compact.py): what each
encoding keeps, and where its error bounds lie."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fastopt.backends import compact as C
from fastopt.backends import compact_jit as J


def _bf16_nearest(x):
    b = x.view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    # a value a quarter of the way from 1 to the next bfloat16 (1 + 2**-7)
    x = np.full(1 << 16, 1 + 2.0 ** -9, np.float32)
    bits = C.bf16_encode_sr(x, C.sr_key(0, 1, 0), np.arange(x.size))
    values = C.bf16_decode(bits)
    assert set(np.unique(values)) == {np.float32(1), np.float32(1 + 2.0 ** -7)}
    assert np.mean(values == 1 + 2.0 ** -7) == pytest.approx(0.25, abs=0.01)
    assert values.astype(np.float64).mean() == pytest.approx(1 + 2.0 ** -9, rel=1e-4)


def test_stochastic_rounding_keeps_exact_values_and_non_finite_ones():
    x = np.array([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    bits = C.bf16_encode_sr(x, 12345, np.arange(x.size))
    back = C.bf16_decode(bits)
    np.testing.assert_array_equal(back[:6], x[:6])
    assert np.signbit(back[1]) and np.isnan(back[6:]).all() and np.signbit(back[7])


def test_a_slow_average_moves_under_stochastic_rounding_and_freezes_when_rounded_to_nearest():
    """v <- 0.999 v + 0.001 * 0.5 from 1: each step's change is below half a
    bfloat16 ulp, so nearest rounding never leaves 1.0; stochastic rounding
    follows the exact value (the reason it is the bfloat16 state's rounding)."""
    n, steps = 4096, 600
    exact = 0.5 + 0.5 * 0.999 ** steps
    sr = nearest = np.full(n, 1.0, np.float32)
    sr_bits = C.bf16_encode_sr(sr, 0, np.arange(n))
    near_bits = _bf16_nearest(nearest)
    for t in range(steps):
        step = lambda bits: C.bf16_decode(bits) * np.float32(0.999) + np.float32(0.0005)
        sr_bits = C.bf16_encode_sr(step(sr_bits), C.sr_key(7, t, 1), np.arange(n))
        near_bits = _bf16_nearest(step(near_bits))
    assert (C.bf16_decode(near_bits) == 1.0).all()
    assert C.bf16_decode(sr_bits).mean() == pytest.approx(exact, rel=2e-3)


def test_the_random_bits_depend_on_key_and_index_only():
    idx = np.arange(10_000)
    a = C.random_bits(C.sr_key(1, 5, 0), idx)
    assert a.max() < 1 << 16 and np.abs(a.mean() / (1 << 16) - 0.5) < 0.01
    # any split of the index range draws the same bits (thread-count independence)
    np.testing.assert_array_equal(np.concatenate([C.random_bits(C.sr_key(1, 5, 0), idx[:37]),
                                                  C.random_bits(C.sr_key(1, 5, 0), idx[37:])]), a)
    for other in (C.sr_key(2, 5, 0), C.sr_key(1, 6, 0), C.sr_key(1, 5, 1)):
        assert np.mean(C.random_bits(other, idx) == a) < 0.01


def test_an_elements_random_bits_are_uniform_from_step_to_step():
    """The bits are the top half of one product: what makes them random for
    an element is the fresh key each step. Over 4096 steps, each of 16 bins
    of the 16 bits holds its share (chi-square, 15 degrees of freedom, far
    below the 0.1% point of 37.7), and the two buffers' bits of one element
    are uncorrelated."""
    steps = 4096
    for index in (0, 1, 255, 1 << 20, (1 << 32) - 1):
        idx = np.array([index], np.uint32)
        m = np.concatenate([C.random_bits(C.sr_key(3, t, 0), idx) for t in range(steps)])
        v = np.concatenate([C.random_bits(C.sr_key(3, t, 1), idx) for t in range(steps)])
        counts = np.bincount(m >> 12, minlength=16)
        assert ((counts - steps / 16) ** 2 / (steps / 16)).sum() < 37.7, index
        assert abs(np.corrcoef(m, v)[0, 1]) < 0.06, index


def test_within_a_step_the_bits_spread_evenly_and_far_indices_are_linked():
    """Within one step, consecutive indices step through the top bits by
    about the golden ratio: any 4096 of them fill 16 bins almost exactly
    (more evenly than independent draws would). The draws of one step are
    linked, not independent: indices 2**16 apart differ by one of two
    constants mod 2**16, whatever the key. Each element's draw is still
    uniform and fresh every step (the test above), which is what unbiased
    rounding needs; compact.py's doc says so."""
    for key in (C.sr_key(1, 5, 0), C.sr_key(9, 100, 2)):
        idx = np.arange(70_000, 70_000 + 4096, dtype=np.uint32)
        bits = C.random_bits(key, idx)
        counts = np.bincount(bits >> 12, minlength=16)
        assert np.abs(counts - 256).max() <= 8
        far = (C.random_bits(key, idx ^ np.uint32(1 << 16)) - bits) & 0xFFFF
        assert set(np.unique(far)) <= {0x79B1, 0x864F}


def test_compiled_twins_round_bit_for_bit_like_numpy():
    @njit
    def encode(x, key):
        out = np.empty(x.size, np.uint16)
        b = x.view(np.uint32)
        for i in range(x.size):
            out[i] = J.bf16_encode_sr_one(b[i], key, i)
        return out

    @njit
    def decode(h):
        out = np.empty(h.size, np.uint32)
        for i in range(h.size):
            out[i] = J.bf16_decode_one(h[i])
        return out.view(np.float32)

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 1e3,
                        np.array([np.nan, -np.inf, 3.3895314e38], np.float32)])
    key = C.sr_key(3, 9, 1)
    bits = encode(x, key)
    np.testing.assert_array_equal(bits, C.bf16_encode_sr(x, key, np.arange(x.size)))
    np.testing.assert_array_equal(decode(bits).view(np.uint32),
                                  C.bf16_decode(bits).view(np.uint32))


KEY = C.sr_key(5, 3, 2)


def _q8_roundtrip(x, signed, key=KEY):
    absmax = C.q8_absmax(x)
    idx = np.arange(x.size)
    if signed:
        codes = C.q8_encode_signed(x, absmax, key, idx)
        return codes, absmax, C.q8_decode_signed(codes, absmax)
    codes = C.q8_encode_unsigned(x, absmax, key, idx)
    return codes, absmax, C.q8_decode_unsigned(codes, absmax)


def test_signed_8_bit_grid_error_bounds():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20_000) * np.exp(rng.uniform(-12, 0, 20_000))).astype(np.float32)
    codes, absmax, back = _q8_roundtrip(x, signed=True)
    scale = np.repeat(absmax, C.BLOCK)[:x.size]
    normal = np.abs(x) >= scale * 2.0 ** -14
    # 3 mantissa bits, rounded to a neighbour: within one grid step, <= 1/8 of the value
    assert (np.abs(back - x)[normal] <= np.abs(x)[normal] / 8 * (1 + 1e-6)).all()
    # below the lowest binade: within one linear step
    assert (np.abs(back - x)[~normal] <= scale[~normal] * 2.0 ** -17 * (1 + 1e-6)).all()
    assert (np.sign(back) * np.sign(x) >= 0).all()
    assert np.abs(codes.astype(int)).max() == 120      # 1.0 is the top code: absmax exact
    np.testing.assert_array_equal(C.q8_absmax(back), absmax)


def test_unsigned_8_bit_grid_never_turns_a_positive_value_into_zero():
    rng = np.random.default_rng(2)
    v = (rng.standard_normal(5000) ** 2 * np.exp(rng.uniform(-40, 0, 5000))).astype(np.float32)
    v[::10] = 0.0
    v[5::10] = -0.0
    codes, absmax, back = _q8_roundtrip(v, signed=False)
    assert ((back > 0) == (v > 0)).all()
    scale = np.repeat(absmax, C.BLOCK)[:v.size]
    normal = v >= scale * 2.0 ** -30
    assert (np.abs(back - v)[normal] <= v[normal] / 8 * (1 + 1e-6)).all()
    assert (back[v > 0] >= scale[v > 0] * 2.0 ** -33).all()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_8_bit_rounding_is_unbiased_between_grid_neighbours(signed):
    """A value 3/8 of the way between two codes (in a binade, and in the
    linear range below the lowest) lands on one of them, the upper with
    probability 3/8: the mean over the elements is the value."""
    low = 2.0 ** (C.SIGNED_GRID[0] - 127 if signed else C.UNSIGNED_GRID[0] - 127)
    for value in (0.5 * (1 + 3 / 64), low / 8 * (2 + 3 / 8)):
        x = np.full(1 << 16, value, np.float32)
        x[::C.BLOCK] = 1.0                          # every block's absmax
        _, _, back = _q8_roundtrip(x, signed)
        rest = np.delete(back, np.s_[::C.BLOCK])
        assert len(np.unique(rest)) == 2
        assert rest.astype(np.float64).mean() == pytest.approx(value, rel=2e-3)


def test_8_bit_blocks_are_independent_and_a_zero_block_stays_zero():
    x = np.zeros(3 * C.BLOCK + 5, np.float32)
    x[C.BLOCK:2 * C.BLOCK] = np.linspace(-1e-3, 1e-3, C.BLOCK)
    x[-5:] = 7.0
    _, absmax, back = _q8_roundtrip(x, signed=True)
    np.testing.assert_array_equal(absmax, np.float32([0, 1e-3, 0, 7]))
    assert (back[:C.BLOCK] == 0).all() and (back[-5:] == 7).all()
    assert np.abs(back - x)[C.BLOCK:2 * C.BLOCK].max() <= 1e-3 / 8


def test_compiled_8_bit_twins_are_bit_for_bit_the_numpy_codecs():
    """Every code (both grids, including NaN/inf blocks, signed zeros and the
    values near the subnormal range), decoded and encoded by the Numba twins."""
    @njit
    def encode(x, absmax, signed, key):
        out = np.empty(x.size, np.int64)
        for i in range(x.size):
            out[i] = J.q8_encode_one(x[i], absmax[i // 256], signed, key, i)
        return out

    @njit
    def decode(codes, absmax, signed):
        out = np.empty(codes.size, np.float32)
        for i in range(codes.size):
            out[i] = J.q8_decode_one(codes[i], absmax[i // 256], signed)
        return out

    @njit
    def absmax_of(x):
        out = np.zeros((x.size + 255) // 256, np.uint32)
        for i in range(x.size):
            out[i // 256] = max(out[i // 256], J.without_inf(J.absmax_bits_one(x[i])))
        return out.view(np.float32)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(60_000) * np.exp(rng.uniform(-45, 3, 60_000))).astype(np.float32)
    x[::97], x[5::97], x[7::1001] = 0.0, -0.0, np.float32(1e-45)
    x[300], x[600], x[900] = np.nan, np.inf, -np.inf
    absmax = C.q8_absmax(x)
    np.testing.assert_array_equal(absmax_of(x), absmax)      # NaN blocks: NaN
    for signed, dtype in ((True, np.int8), (False, np.uint8)):
        with np.errstate(invalid="ignore"):
            codes, _, back = _q8_roundtrip(x, signed, key=KEY)
        np.testing.assert_array_equal(encode(x, absmax, signed, KEY).astype(dtype), codes)
        every = np.arange(256, dtype=np.int64).astype(dtype)
        scale = np.full(1, 3.5, np.float32)
        want = (C.q8_decode_signed if signed else C.q8_decode_unsigned)(every, scale)
        np.testing.assert_array_equal(decode(every, scale, signed).view(np.uint32),
                                      want.view(np.uint32))
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(decode(codes, absmax, signed), back)

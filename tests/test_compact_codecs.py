"""The compact-state codecs (fastopt/backends/compact.py): what each
encoding keeps, and where its error bounds lie."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fastopt.backends import compact as C


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


def test_compiled_twins_round_bit_for_bit_like_numpy():
    @njit
    def encode(x, key):
        out = np.empty(x.size, np.uint16)
        b = x.view(np.uint32)
        for i in range(x.size):
            out[i] = C.bf16_encode_sr_one(b[i], key, i)
        return out

    @njit
    def decode(h):
        out = np.empty(h.size, np.uint32)
        for i in range(h.size):
            out[i] = C.bf16_decode_one(h[i])
        return out.view(np.float32)

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 1e3,
                        np.array([np.nan, -np.inf, 3.3895314e38], np.float32)])
    key = C.sr_key(3, 9, 1)
    bits = encode(x, key)
    np.testing.assert_array_equal(bits, C.bf16_encode_sr(x, key, np.arange(x.size)))
    np.testing.assert_array_equal(decode(bits).view(np.uint32),
                                  C.bf16_decode(bits).view(np.uint32))


def test_signed_8_bit_grid_error_bounds():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20_000) * np.exp(rng.uniform(-12, 0, 20_000))).astype(np.float32)
    absmax = C.q8_absmax(x)
    codes = C.q8_encode_signed(x, absmax)
    back = C.q8_decode_signed(codes, absmax)
    scale = np.repeat(absmax, C.BLOCK)[:x.size]
    normal = np.abs(x) >= scale * 2.0 ** -14
    # 3 mantissa bits, rounded to nearest: relative error at most 1/16
    assert (np.abs(back - x)[normal] <= np.abs(x)[normal] / 16 * (1 + 1e-6)).all()
    # below the lowest binade: absolute error at most half a grid step
    assert (np.abs(back - x)[~normal] <= scale[~normal] * 2.0 ** -18 * (1 + 1e-6)).all()
    assert (np.sign(back) * np.sign(x) >= 0).all()
    assert np.abs(codes.astype(int)).max() == 120      # 1.0 is the top code: absmax exact
    np.testing.assert_array_equal(C.q8_absmax(back), absmax)


def test_unsigned_8_bit_grid_never_turns_a_positive_value_into_zero():
    rng = np.random.default_rng(2)
    v = (rng.standard_normal(5000) ** 2 * np.exp(rng.uniform(-40, 0, 5000))).astype(np.float32)
    v[::10] = 0.0
    absmax = C.q8_absmax(v)
    back = C.q8_decode_unsigned(C.q8_encode_unsigned(v, absmax), absmax)
    assert ((back > 0) == (v > 0)).all()
    scale = np.repeat(absmax, C.BLOCK)[:v.size]
    normal = v >= scale * 2.0 ** -30
    assert (np.abs(back - v)[normal] <= v[normal] / 16 * (1 + 1e-6)).all()
    assert (back[v > 0] >= scale[v > 0] * 2.0 ** -33).all()


def test_8_bit_blocks_are_independent_and_a_zero_block_stays_zero():
    x = np.zeros(3 * C.BLOCK + 5, np.float32)
    x[C.BLOCK:2 * C.BLOCK] = np.linspace(-1e-3, 1e-3, C.BLOCK)
    x[-5:] = 7.0
    absmax = C.q8_absmax(x)
    np.testing.assert_array_equal(absmax, np.float32([0, 1e-3, 0, 7]))
    back = C.q8_decode_signed(C.q8_encode_signed(x, absmax), absmax)
    assert (back[:C.BLOCK] == 0).all() and (back[-5:] == 7).all()
    assert np.abs(back - x)[C.BLOCK:2 * C.BLOCK].max() <= 1e-3 / 16

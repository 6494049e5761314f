"""Where large state buffers start (fastopt._memory): whole cache lines, and
never the page-plus-size apart that back-to-back allocations of one size
give (the distance that made the bfloat16 step 20-30% slower at 64M)."""

import numpy as np
import pytest

import fastopt
from fastopt import _memory as M

BIG = M.LARGE + 1        # elements: past the threshold in every state format


def test_a_large_buffer_is_zero_aligned_and_its_own_size():
    for dtype in (np.float32, np.uint16, np.int8):
        a = M.state_zeros(M.LARGE // np.dtype(dtype).itemsize + 3, dtype)
        assert a.dtype == dtype and a.shape == (M.LARGE // np.dtype(dtype).itemsize + 3,)
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.flags.writeable
        assert not a.any()


def test_large_buffers_turn_through_quarter_pages_wherever_the_heap_puts_them():
    """The offset is the address's: glibc serves a freed size from its heap
    (its mmap threshold raised) at any place in a page, and an offset into
    the allocation left two buffers a whole number of pages apart in about
    one case in 64 (a CI run's failure below)."""
    for _ in range(3):
        junk = [np.zeros(M.LARGE + 64 * k, np.uint8) for k in range(1, 9)]
        del junk     # freed: the next ones may come from the heap, anywhere in a page
        placed = [M.state_zeros(M.LARGE // 2 + 1, np.uint16) for _ in range(4)]
        offsets = [a.ctypes.data % 4096 for a in placed]
        assert sorted(offsets) == [0, 1024, 2048, 3072], offsets


def test_back_to_back_large_buffers_are_not_a_whole_number_of_pages_apart():
    """(Plain np.zeros of one power-of-two size, made back to back, land
    exactly size + 4096 bytes apart.) Placed ones move by a quarter page."""
    size = 1 << 25          # past glibc's largest mmap threshold: its own mapping
    placed = [M.state_zeros(size, np.uint8) for _ in range(4)]
    for a, b in zip(placed, placed[1:]):
        assert abs(a.ctypes.data - b.ctypes.data) % 4096 != 0


def test_small_buffers_are_plain_arrays_and_copies_keep_values():
    small = M.state_zeros(10, np.float32)
    assert small.base is None and not small.any()
    src = np.arange(BIG, dtype=np.float32)
    c = M.state_copy(src)
    np.testing.assert_array_equal(c, src)
    assert c.ctypes.data % 64 == 0 and not np.shares_memory(c, src)
    grid = (src[:-1] % 1000).reshape(2, -1).astype(np.float16)
    c = M.state_copy(grid, np.float32)          # a shape and a dtype kept or given
    assert c.shape == grid.shape and c.dtype == np.float32
    np.testing.assert_array_equal(c, grid.astype(np.float32))


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_an_optimizers_large_state_is_placed_and_survives_a_checkpoint(fmt):
    p = [np.ones(BIG, np.float32)]
    opt = fastopt.AdamW(p, lr=1e-3, state_dtype=fmt)
    opt.step([np.full(BIG, 1e-3, np.float32)])
    bufs = [b for b in opt.state[0]["flat"].values() if b.nbytes >= M.LARGE]
    assert len(bufs) == 2 and all(b.ctypes.data % 64 == 0 for b in bufs)
    assert abs(bufs[0].ctypes.data - bufs[1].ctypes.data) % 4096 != 0
    again = fastopt.AdamW([p[0].copy()], lr=1e-3, state_dtype=fmt)
    again.load_state_dict(opt.state_dict())
    for name, b in opt.state[0]["flat"].items():
        np.testing.assert_array_equal(again.state[0]["flat"][name], b)
        if b.nbytes >= M.LARGE:
            assert again.state[0]["flat"][name].ctypes.data % 64 == 0


def test_lbfgs_and_sam_count_their_own_state():
    """``state_nbytes`` of L-BFGS is its history's vectors (it said 0 while
    holding ``history_size + 1`` pairs of them), and SAM's is its base's plus
    its perturbation buffer (it had none)."""
    x = np.ones(1000)
    lbfgs = fastopt.LBFGS([x], history_size=10)
    assert lbfgs.state_nbytes() == 0
    for _ in range(3):
        lbfgs.step(lambda: (float(x @ x), [2 * x]))
    hist = lbfgs.state[0]["history"]
    rows = sum(v is not None for v in hist.S + hist.Y)
    assert rows >= 2 and lbfgs.state_nbytes() == rows * x.nbytes
    sd = lbfgs.state_dict()["lbfgs"]
    assert lbfgs.state_nbytes() >= sd["old_dirs"].nbytes + sd["old_stps"].nbytes

    p = np.ones(10, np.float32)
    sam = fastopt.SAM(fastopt.SGD([p], lr=0.1, momentum=0.9))
    sam.perturb([np.ones(10, np.float32)])
    sam.step([np.ones(10, np.float32)])
    assert sam.base_optimizer.state_nbytes() == p.nbytes          # the momentum buffer
    assert sam.state_nbytes() == 2 * p.nbytes                      # and e_w

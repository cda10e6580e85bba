"""CRC-32 of a concatenation from its parts' CRC-32s (what reslice derives output checksums by)."""

import functools
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt._format import crc32_combine


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_equals_crc_of_the_concatenation(a, b):
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_folding_parts_in_order_gives_the_whole(parts):
    folded = functools.reduce(lambda c, p: crc32_combine(c, zlib.crc32(p), len(p)), parts, 0)
    assert folded == zlib.crc32(b"".join(parts))


@given(st.binary(max_size=64), st.integers(0, 5 << 20))
def test_long_parts(a, n):
    # lengths far beyond the examples above: every bit of 8·n is exercised
    b = bytes(n)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n) == zlib.crc32(a + b)


def test_empty_parts_and_bad_lengths():
    assert crc32_combine(0x12345678, 0, 0) == 0x12345678
    assert crc32_combine(0, zlib.crc32(b"abc"), 3) == zlib.crc32(b"abc")
    with pytest.raises(ValueError):
        crc32_combine(0, 0, -1)

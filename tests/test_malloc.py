"""glibc malloc settings that keep freed training memory in the process."""

import ctypes
import platform
import sys

import pytest

from incentive.malloc import keep_freed_memory


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_applies_on_glibc_and_freed_blocks_come_back_from_the_heap():
    assert keep_freed_memory.__wrapped__() is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # an 8 MB block: mmapped (and unmapped on free) by default, from the heap once the threshold is 32 MB
    first = libc.malloc(8 << 20)
    libc.free(first)
    second = libc.malloc(8 << 20)
    libc.free(second)
    assert first == second


def test_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory.__wrapped__() is False

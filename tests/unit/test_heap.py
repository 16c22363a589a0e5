"""Freed heap memory goes back to the OS after `heap.release()` (glibc; the tests run on Linux)."""

import psutil

from piplay_ray.cluster import heap


def test_release_returns_freed_heap_pages():
    rss = psutil.Process().memory_info
    # 64 KiB blocks come from the heap (under glibc's mmap threshold); keeping every 64th pins the heap's
    # top, so free() alone cannot give the pages back
    blocks = [bytearray(64 << 10) for _ in range(4096)]  # 256 MiB
    kept = blocks[::64]
    del blocks
    before = rss().rss
    assert heap.release()  # without the trim this drop is ~0 (the pages stay mapped)
    assert before - rss().rss > 128 << 20
    assert len(kept) == 64

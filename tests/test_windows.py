"""edge_memdec.windows: which positions each protocol's windows score."""

from __future__ import annotations

import pytest

from edge_memdec.windows import llama_windows, paper_windows


@pytest.mark.parametrize(("n", "ctx", "stride"), [(2500, 1024, 512), (17, 5, 2), (1025, 1024, 512), (9, 9, 1)])
def test_paper_windows_score_every_target_once_inside_its_window(n, ctx, stride):
    windows = paper_windows(n, ctx, stride)
    targets = [t + 1 for w in windows for t in range(w.first_new, w.stop)]
    assert targets == list(range(1, n))
    assert all(w.end - w.begin <= ctx and w.begin <= w.first_new and w.stop < w.end for w in windows)


def test_paper_windows_with_stride_equal_to_the_context_skip_each_window_start():
    windows = paper_windows(10, 4, 4)
    assert [t + 1 for w in windows for t in range(w.first_new, w.stop)] == [1, 2, 3, 5, 6, 7, 9]


def test_llama_windows_score_the_second_half_of_whole_chunks():
    windows = llama_windows(10, 4)
    assert [(w.begin, w.end, w.first_new, w.stop) for w in windows] == [(0, 4, 2, 3), (4, 8, 6, 7)]

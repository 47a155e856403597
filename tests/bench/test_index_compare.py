"""The side-by-side index figures: ours always, SGLang's RadixCache when its file is there."""

from __future__ import annotations

import numpy as np
import pytest

from bench import index_compare
from bench.baselines import sglang_radix
from bench.mempool import cached_prompts

FIGURES = {
    "match 4K",
    "insert 4K",
    "drain after insert 4K",
    "insert 16K",
    "drain after insert 16K",
    "evict 4,096 tokens",
}


def test_without_sglang_ours_are_measured_and_its_column_is_empty() -> None:
    cached = cached_prompts(200, np.random.default_rng(0))
    result = index_compare.run(cached, repeats=3, sglang_path="/nonexistent/radix_cache.py")
    assert set(result["ours"]) == FIGURES and result["sglang"] == {}
    assert result["sglang_source"] is None
    assert all(r[2] == "-" for r in index_compare.rows(result))
    assert "make bench-baselines" in index_compare.absent_line()


def test_sglang_radix_cache_runs_the_same_figures() -> None:
    if sglang_radix.find() is None:
        pytest.skip("SGLang's radix_cache.py is absent (`make bench-baselines` installs it)")
    cached = cached_prompts(200, np.random.default_rng(0))
    result = index_compare.run(cached, repeats=3)
    assert set(result["sglang"]) == FIGURES - {"drain after insert 4K", "drain after insert 16K"}
    assert result["sglang_version"] == sglang_radix.SGLANG_VERSION

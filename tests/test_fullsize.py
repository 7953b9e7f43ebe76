"""LLaVA-1.5-7B's and InstructBLIP-Vicuna-7B's full width against HF torch
(bench.fullsize_parity, bench.fullsize_parity_instructblip): opt-in, as each writes a 2.9 /
3.6 GB checkpoint (once, cached) and holds it twice, in torch and in JAX (8 GiB peak RSS,
about 5 minutes each on a 2-core CPU; hold the heavy lock).

  VICROP_FULLSIZE=1 python -m pytest tests/test_fullsize.py
  VICROP_FULLSIZE_DIR=/path/to/cache       (default /tmp/vicrop_fullsize/wide2)
  VICROP_FULLSIZE_BLIP_DIR=/path/to/cache  (default /tmp/vicrop_fullsize/blip_wide2)
"""

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("VICROP_FULLSIZE") != "1", reason="set VICROP_FULLSIZE=1 (3 GB, ~5 min)"
)


def test_wide2_matches_torch():
    from bench.fullsize_parity import report, run_parity

    result = run_parity(os.environ.get("VICROP_FULLSIZE_DIR", "/tmp/vicrop_fullsize/wide2"))
    assert not result["failures"], report(result)


def test_instructblip_wide2_matches_torch():
    from bench.fullsize_parity import report
    from bench.fullsize_parity_instructblip import run_parity

    path = os.environ.get("VICROP_FULLSIZE_BLIP_DIR", "/tmp/vicrop_fullsize/blip_wide2")
    result = run_parity(path)
    assert not result["failures"], report(result)

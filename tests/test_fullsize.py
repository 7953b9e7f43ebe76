"""LLaVA-1.5-7B's full width against HF torch (bench.fullsize_parity): opt-in, as it writes a
2.9 GB checkpoint (once, cached) and holds it twice, in torch and in JAX (8 GiB peak RSS,
about 5 minutes on a 2-core CPU).

  VICROP_FULLSIZE=1 python -m pytest tests/test_fullsize.py
  VICROP_FULLSIZE_DIR=/path/to/cache  (default /tmp/vicrop_fullsize/wide2)
"""

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("VICROP_FULLSIZE") != "1", reason="set VICROP_FULLSIZE=1 (2.9 GB, ~5 min)"
)


def test_wide2_matches_torch():
    from bench.fullsize_parity import report, run_parity

    result = run_parity(os.environ.get("VICROP_FULLSIZE_DIR", "/tmp/vicrop_fullsize/wide2"))
    assert not result["failures"], report(result)

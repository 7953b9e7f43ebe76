"""bench.compile_time on a tiny config: every pass lowers; the table sums rel-att's passes."""

import jax.numpy as jnp

from bench import compile_time
from vicrop_jax.models.llava import LlavaConfig
from vicrop_jax.testing import hf_config_dict


def test_every_pass_lowers_and_the_table_sums_rel_att():
    config = LlavaConfig.from_dict(hf_config_dict(text_layers=2))
    lowerings = compile_time.pass_lowerings(config, 1, jnp.float32, text_tokens=12,
                                            max_new_tokens=3)  # fmt: skip
    assert set(compile_time.REL_ATT_PASSES) <= set(lowerings)
    assert {"grad_att_map", "pure_grad_map", "greedy_generate"} <= set(lowerings)
    for name, lower in lowerings.items():
        assert "func.func" in lower().as_text()[:100000], name
    times = {
        "start_pass": {"lower_s": 1.0, "compile_s": 20.0, "total_s": 21.0},
        "finish_pass": {"lower_s": 1.0, "compile_s": 30.0, "total_s": 31.0},
        "grad_att_map": {"lower_s": 1.0, "compile_s": 9.0, "total_s": 10.0},
    }
    assert "| 50.0 | 52.0 (within 60 s) |" in compile_time.table({"x": times}, bar=60)
    assert "(**over** 50 s)" in compile_time.table({"x": times}, bar=50)
    assert "| every pass above | | | 62.0 |" in compile_time.table({"x": times}, bar=60)

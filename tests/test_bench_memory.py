"""bench.memory: XLA's memory plan of the prefix passes, on a 1-layer preset (full widths)."""

import jax
import jax.numpy as jnp
import numpy as np

from bench import memory
from vicrop_jax.models.llava import LlavaConfig, abstract_params
from vicrop_jax.testing import preset_config_dict


def test_plans_hold_the_weights_and_the_prefix_cache():
    config = LlavaConfig.from_dict(
        preset_config_dict("llava-1.5-7b", 32000, vision_layers=1, text_layers=1)
    )
    b = 2
    plans = memory.pass_plans(config, b, jnp.bfloat16, text_tokens=40, max_new_tokens=4, layer=0)
    assert set(plans) == {"start_pass", "answer_pass", "finish_pass"}
    # Arguments a pass does not read are dropped (jit's keep_unused=False): count the decoder,
    # head and projector, which every pass reads, and not the whole vision tower.
    params = abstract_params(config)
    used = [params[k] for k in ("language_model", "lm_head", "multi_modal_projector")]
    weights = sum(np.prod(x.shape) * 2 for x in jax.tree.leaves(used))
    t = config.text_config
    prefix = 2 * b * (1 + config.num_image_tokens) * t.num_key_value_heads * t.head_dim * 2
    gib = memory.GIB
    for name, plan in plans.items():
        assert plan["args_gib"] * gib >= weights, name
        assert plan["total_gib"] >= plan["args_gib"] > 0, name
    # start_pass returns the prefix cache (bf16 K and V of 1 + T tokens a row) to finish_pass.
    assert plans["start_pass"]["out_gib"] * gib >= prefix
    assert plans["finish_pass"]["args_gib"] * gib >= weights + prefix
    tight = memory.table({b: plans}, budget=plans["finish_pass"]["total_gib"] - 1e-3)
    assert [r for r in tight.splitlines() if "finish_pass" in r][0].endswith("| **no** |")
    roomy = memory.table({b: plans}, budget=max(p["total_gib"] for p in plans.values()))
    assert "**no**" not in roomy and roomy.count("| yes |") == 3

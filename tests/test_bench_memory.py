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


def test_mesh_plan_splits_the_decoder_and_the_cache_over_the_model_axis():
    import dataclasses

    import pytest

    config = memory.find_preset("llava-1.5-13b")
    config = dataclasses.replace(
        config, text_config=dataclasses.replace(config.text_config, num_hidden_layers=1)
    )
    one = memory.mesh_plan(config, (1, 1), jnp.bfloat16, batch=4, cache_tokens=100)
    two = memory.mesh_plan(config, (2, 2), jnp.bfloat16, batch=4, cache_tokens=100)
    t = config.text_config
    lm = (t.vocab_size * t.hidden_size * 2  # embedding and head
          + t.hidden_size * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
          + 3 * t.hidden_size * t.intermediate_size)  # fmt: skip
    assert one["weights_split_gib"] * memory.GIB == lm * 2  # bfloat16
    assert two["weights_split_gib"] == one["weights_split_gib"] / 2
    assert two["weights_replicated_gib"] == one["weights_replicated_gib"] > 0  # the towers
    # K and V, 4 rows of 100 slots: rows over data (2), heads over model (2).
    assert one["kv_cache_gib"] * memory.GIB == 2 * 4 * 100 * t.num_key_value_heads * t.head_dim * 2
    assert two["kv_cache_gib"] == one["kv_cache_gib"] / 4
    assert "| 2 x 2 | 4 |" in memory.mesh_table([two], budget=1.0)
    with pytest.raises(ValueError, match=r"model axis \(3\) does not divide "
                       r"text_config.num_attention_heads \(40\)"):  # fmt: skip
        memory.mesh_plan(config, (1, 3), jnp.bfloat16, batch=1, cache_tokens=10)
    with pytest.raises(ValueError, match="unknown preset"):
        memory.find_preset("llava-9b")

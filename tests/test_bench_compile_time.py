"""bench.compile_time on a tiny config: every pass lowers; the table sums rel-att's passes; the
--eval_flagfile mode predicts a run's programs as the engine batches them and lowers each."""

import jax.numpy as jnp
import pytest

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


# ---------------------------------------------------------------------------------------
# --eval_flagfile: a whole eval run's programs.

T, GENERAL = 25, 10  # a tiny LLaVA's image tokens; its general prompt's tail


def _q(tail, map_tail=None, tiles=1):
    return compile_time.Question(tail, tail if map_tail is None else map_tail, tiles)


def test_the_flagfiles_plans(tmp_path):
    plan = compile_time.eval_plan("eval/flags/textvqa_llava.flags")
    assert (plan.task, plan.batch, plan.max_new_tokens, plan.short_maps) == (
        "textvqa",
        8,
        20,
        False,
    )
    assert plan.methods == ("rel_att", "grad_att", "pure_grad", "random_crop", "center_crop")
    plan = compile_time.eval_plan("eval/flags/vstar_llava.flags")
    assert plan.short_maps and plan.methods[:3] == (
        "rel_att_high",
        "grad_att_high",
        "pure_grad_high",
    )
    # An overlay flagfile, --high_res, --map_question=full and a later line winning.
    path = tmp_path / "x.flags"
    path.write_text(
        "# comment\n--flagfile=eval/flags/vstar_llava.flags\n--methods=rel_att\n"
        "--high_res\n--map_question=full\n--batch_size=4\n"
    )
    plan = compile_time.eval_plan(str(path))
    assert (plan.methods, plan.batch, plan.short_maps) == (("rel_att_high",), 4, False)
    path.write_text("--task=pope\n")
    with pytest.raises(ValueError, match="--task=pope"):
        compile_time.eval_plan(str(path))


def test_eval_programs_follow_the_runs_batching():
    plan = compile_time.EvalPlan("textvqa", 2, ("rel_att", "grad_att", "center_crop"))
    # Batches [5, 12], [20, 3], [7] (the last padded with its own question).
    qs = [_q(5), _q(12), _q(20), _q(3), _q(7)]
    got = compile_time.eval_programs(plan, qs, image_tokens=T, general_tail=GENERAL,
                                     tail_multiple=8, map_multiple=32)  # fmt: skip
    assert got == {
        ("start_pass", 16): 2, ("start_pass", 24): 1,  # max(tails, general) to 8s
        ("finish_pass", 40): 3, ("finish_pass", 48): 3,  # T + max tail, once a method
        ("finish_pass", 32): 3,
        ("grad_att_map", 64): 3,  # 1 + T + max(tail, general) <= 46 -> 64
    }  # fmt: skip
    # Maps asked with short questions: answer_pass, and rel_att's own map program; *_high
    # tiles fill batches of their own.
    plan = compile_time.EvalPlan("vstar", 2, ("rel_att_high", "gt_crop"), short_maps=True)
    qs = [_q(40, 5, tiles=3), _q(44, 40, tiles=1)]
    got = compile_time.eval_programs(plan, qs, image_tokens=T, general_tail=GENERAL,
                                     tail_multiple=8, map_multiple=32)  # fmt: skip
    # Tiles [5, 5], [5, 40]: 1 + 25 + 10 -> 64, 1 + 25 + 40 -> 96.
    assert got == {("answer_pass", 48): 1, ("rel_att_map", 64): 1, ("rel_att_map", 96): 1,
                   ("finish_pass", 72): 2}  # fmt: skip


def test_the_eval_mode_lowers_every_program_and_totals_them():
    config = LlavaConfig.from_dict(hf_config_dict(text_layers=2))
    plan = compile_time.EvalPlan("vstar", 2, ("rel_att", "grad_att_high", "pure_grad"))
    qs = [_q(9), _q(30, tiles=2), _q(17)]
    programs = compile_time.eval_programs(plan, qs, image_tokens=config.num_image_tokens,
                                          general_tail=GENERAL, tail_multiple=8,
                                          map_multiple=32)  # fmt: skip
    names = {k[0] for k in programs}
    assert names == {"start_pass", "finish_pass", "grad_att_map", "pure_grad_map"}
    for key in {k[0]: k for k in sorted(programs)}.values():  # one of each pass (time)
        lower = compile_time.program_lowering(config, plan.batch, jnp.float32, key,
                                              max_new_tokens=2, layers=(1,))  # fmt: skip
        text = lower().as_text()
        assert "func.func" in text[:100000], key
        assert f"x{key[1]}xi32" in text, key  # the prompt input at its bucketed length
    times = {
        "start_pass@16": {"lower_s": 1.0, "compile_s": 90.0, "total_s": 91.0, "cpu_s": 90.5},
        "finish_pass@40": {"lower_s": 1.0, "compile_s": 99.0, "total_s": 100.0, "cpu_s": 99.5},
    }
    calls = {"x": {"start_pass@16": 2, "finish_pass@40": 6}}
    table = compile_time.eval_table({"x": times}, calls, bar=180)
    assert "| x | finish_pass@40 | 6 | 1.0 | 99.0 | 100.0 | 99.5 |" in table
    assert "| x | 2 programs | | | 189.0 | 191.0 | 190.0 (**over** by 10 s, 180 s) |" in table
    assert "(within 200 s)" in compile_time.eval_table({"x": times}, calls, bar=200)


def test_the_engine_buckets_the_shared_tails_like_its_prompts(tiny_llava, monkeypatch):
    from eval.engine import LENGTH_BUCKET, Engine
    from vicrop_jax import prompt_cache

    seen = {}
    monkeypatch.setattr(prompt_cache, "start", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(prompt_cache, "start_answers", lambda *a, **kw: seen.update(kw))
    Engine(tiny_llava[0], batch_size=2).executor.start([None], ["q"], with_map=True)
    assert seen["multiple"] == LENGTH_BUCKET

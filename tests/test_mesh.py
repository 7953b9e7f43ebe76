"""Params split over a (data, model) mesh give the single-device numbers, on 8 CPU devices.

Each family's sharded runs happen in its own subprocess (tests/mesh_check.py: XLA's device
count is fixed before jax starts); one test per family reads what it wrote. On every mesh
(8, 1), (4, 2), (2, 4), (1, 8): the forward logits, the baseline answers and the maps and
boxes of the mesh's methods against the same checkpoint on one device (float32, atol 1e-5;
answers and boxes identical), and the layouts seen. Each method (rel_att, grad_att,
pure_grad, rel_att_high) runs for each family on one mesh that splits the params, and its
crop answers on one mesh per family (mesh_check.PLAN, mesh_check.CROP); `python -m
tests.mesh_check OUT_DIR --full` runs every method with crop answers on every mesh. The
llava run also gives the one-line refusals and an eval.run smoke run.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import mesh_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=list(mesh_check.PLAN))
def runs(request, tmp_path_factory):
    family = request.param
    root = str(tmp_path_factory.mktemp(f"mesh_{family}"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "tests.mesh_check", root, family], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return family, root


def _load(root, family, mesh=None):
    name = "ref" if mesh is None else f"{mesh[0]}x{mesh[1]}"
    return dict(np.load(os.path.join(root, f"{family}_{name}.npz")))


def test_plan_covers_every_method_and_mesh():
    """Each method on a mesh that splits the params for each family, each method on each
    such mesh for some family, every mesh for every family, crop answers on one."""
    split = [m for m in mesh_check.MESHES if m[1] > 1]
    for family, plan in mesh_check.PLAN.items():
        assert set(plan) == set(mesh_check.MESHES) and all(plan.values()), family
        assert {m for mesh in split for m in plan[mesh]} == set(mesh_check.METHODS), family
        assert mesh_check.CROP[family] in split
    for mesh in split:
        met = {m for plan in mesh_check.PLAN.values() for m in plan[mesh]}
        assert met == set(mesh_check.METHODS), mesh


def test_sharded_runs_equal_one_device(runs):
    family, root = runs
    ref = _load(root, family)
    for mesh, methods in mesh_check.PLAN[family].items():
        got = _load(root, family, mesh)
        compared = [k for k in got if k in ref and k != "shared_prefix"]
        assert "logits" in compared and "answers" in compared, mesh
        for m in methods:
            assert f"{m}/box" in compared and f"{m}/map0" in compared, (mesh, m)
            if mesh == mesh_check.CROP[family]:
                assert f"{m}/crop_answer" in compared, (mesh, m)
        for key in compared:
            a, b = ref[key], got[key]
            if a.dtype.kind == "f":
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-5, err_msg=f"{mesh} {key}")
            else:  # answers, crop answers, boxes: identical
                assert np.array_equal(a, b), (mesh, key, a, b)
        # q_proj kernel [D, N * H]: its columns (whole heads) over model.
        assert str(got["q_proj_spec"]) == str(P(None, "model"))
        d, nh = got["q_proj_shape"]
        assert tuple(got["q_proj_shard"]) == (d, nh // mesh[1])
        if "cache_spec" in got:  # the prefix KV cache [B, P, G, H]: key/value heads over model
            assert str(got["cache_spec"]) in (
                str(P(None, None, "model")),
                str(P(None, None, "model", None)),
            )
    if family == "llava":
        _check_llava_extras(root)


def _check_llava_extras(root):
    # Answers on a model mesh take the shared prompt cache, laid out over heads.
    assert bool(_load(root, "llava", (1, 8))["shared_prefix"])
    assert "cache_spec" in _load(root, "llava", (1, 8))
    # A mesh that does not divide a split dimension is refused first: the weights file is
    # garbage, and the mesh is refused before it is read.
    with open(os.path.join(root, "refusals.json")) as f:
        refused = json.load(f)
    for dim, size in (("num_attention_heads", 6), ("vocab_size", 130)):
        assert refused[dim] == (
            f"ValueError: the mesh's model axis (4) does not divide text_config.{dim} ({size}); "
            "choose a model axis that divides it"
        )
    # eval.run with a mesh shape.
    with open(os.path.join(root, "smoke.json")) as f:
        smoke = json.load(f)
    assert "mesh of 8 local devices: data 1 x model 8" in smoke["log"]
    recs = smoke["records"]
    assert len(recs) == 8 and all(r["error"] is None for r in recs)
    assert all(isinstance(r["crop_answer"], str) and len(r["bbox"]) == 4 for r in recs)


def test_parse_mesh_shape():
    from vicrop_jax.sharding import parse_mesh_shape

    assert parse_mesh_shape("data:2,model:4", 8) == (2, 4)
    assert parse_mesh_shape("model:4", 8) == (2, 4)
    assert parse_mesh_shape(" data:8 ", 8) == (8, 1)
    assert parse_mesh_shape("", 8) == parse_mesh_shape(None, 8) == (8, 1)
    assert parse_mesh_shape("model:2") == (1, 2)  # no devices given: a shape to plan with
    for bad, msg in (("data:2,model:2", "is 2 x 2 = 4 devices, but 8"),
                     ("model:3", "does not divide the 8 devices"),
                     ("tensor:2", "expected data:N or model:N"), ("model:0", "positive int"),
                     ("model:x", "positive int"), ("model:2,model:4", "twice")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_mesh_shape(bad, 8)


def test_every_param_of_every_family_has_a_rule():
    from vicrop_jax.families import FAMILIES
    from vicrop_jax.loading import param_specs
    from vicrop_jax.sharding import path_name

    for name, fam in FAMILIES.items():
        for preset, config in fam.models.PRESETS.items():
            config = _shallow(config)
            specs = param_specs(config, fam.abstract_params(config, np.float32))
            leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
            flat = {path_name(p): s for p, s in leaves}
            assert flat.get("lm_head/kernel", P(None, "model")) == P(None, "model"), preset
            assert flat["language_model/embed_tokens/embedding"] == P("model", None), preset
            split = [k for k, s in flat.items() if "model" in s]
            assert all(k.startswith(("language_model/", "lm_head/")) for k in split), name
            assert set(fam.model_split_sizes(config)) == {
                f"text_config.{f}" for f in ("num_attention_heads", "num_key_value_heads",
                                             "intermediate_size", "vocab_size")}  # fmt: skip


def _shallow(config):
    """A preset with one layer in each tower (same widths): quick to trace."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v) and hasattr(v, "num_hidden_layers"):
            out[f.name] = dataclasses.replace(v, num_hidden_layers=1)
    return dataclasses.replace(config, **out)

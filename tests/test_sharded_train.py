"""A sharded train step on 8 fake CPU devices equals the single-device step.

Meshes: ``fsdp=4, tensor=2`` (parameters split two ways, batch four ways) and ``data=8``. The
same model, initial parameters, batch and step key go through `train.make_train_step` on each
mesh; loss, metrics and the updated parameters must agree to float tolerance after two steps.
"""

import json

import pytest
from sharded_step import sharded_step_script

MODEL = """\
cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn.hidden = 32, 4, 2, 64
"""
MESHES = '(("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}), ("data8", {"data": 8}))'
CODE = sharded_step_script(MODEL, MESHES)


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_step_matches_single_device(multidevice):
    out = multidevice(CODE)
    result = json.loads(out.split("RESULT", 1)[1])
    ref = result["ref"]
    assert len(ref) == 2 and ref[0]["loss"] > 0
    for name in ("fsdp4_tensor2", "data8"):
        got = result[name]
        for step_ref, step_got in zip(ref, got["metrics"]):
            for key in ("loss", "mask_ce", "score_entropy", "mmu_loss", "lm_loss", "grad_norm"):
                assert step_got[key] == pytest.approx(step_ref[key], rel=2e-5, abs=1e-6), (
                    name, key)
        assert got["max_param_diff"] < 1e-5 * max(1.0, got["scale"]), name
    # The fsdp/tensor mesh really splits parameters (else the comparison would be vacuous).
    specs = result["fsdp4_tensor2"]["specs"]
    assert any("tensor" in s for s in specs.values())
    assert any("fsdp" in s for s in specs.values())

"""Evaluation of the unified model: caption mentions, the metrics, the NELBO, and the CLI."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unified_env
from unif2ace_jax.data import records
from unif2ace_jax.data.synthface.attributes import ATTRIBUTES, sample_for_split
from unif2ace_jax.data.synthface.text import CAPTION_MENTION_P, make_caption
from unif2ace_jax.evaluate.mentions import mentioned_attributes


def test_mentions_match_the_generator():
    """The detector finds exactly the attributes the caption generator chose to state.

    Reference: SynthFace draws one uniform per attribute (in ATTRIBUTES order) from the caption
    generator first and states those below CAPTION_MENTION_P; replaying that stream gives the
    true set.
    """
    for heldout in (False, True):
        for i in range(150):
            attr_rng, _, caption_rng, _ = np.random.default_rng([7, int(heldout), i]).spawn(4)
            attributes = sample_for_split(attr_rng, heldout=heldout)
            replay = copy.deepcopy(caption_rng)
            stated = {n for n in ATTRIBUTES if replay.random() < CAPTION_MENTION_P}
            caption = make_caption(attributes, caption_rng)
            assert set(mentioned_attributes(caption, attributes)) == stated, caption


def test_mentions_hand_cases():
    attrs = {"hair_color": "red", "lipstick": "purple", "freckles": "none",
             "hat": "top hat", "glasses": "circular", "head_turn": "left"}
    text = "They have red hair and no freckles. The person wears a top hat and purple lipst"
    assert mentioned_attributes(text, attrs) == {"hair_color": "red", "freckles": "none",
                                                 "hat": "top hat"}
    assert mentioned_attributes("Freckles on the cheeks.", {"freckles": "freckled"}) == {
        "freckles": "freckled"}
    assert mentioned_attributes("She has no freckles.", {"freckles": "freckled"}) == {}
    assert mentioned_attributes("Turned to the left.", attrs) == {"head_turn": "left"}


def _num_questions(split):
    env = unified_env.build_env()
    builder = records.load_builder(env["data_dir"], "synthface_codes")
    source = records.encoded_source(builder, split)
    return sum(len(records.qa_rows(source[i][records.QA])) for i in range(len(source)))


@pytest.mark.slow
def test_evaluate_reports_every_metric():
    from unif2ace_jax.evaluate.unified import evaluate

    workdir = unified_env.trained_run()
    for split in ("test", "test_heldout_combos"):
        result = evaluate(workdir, split, num_generate=3, batch_size=8)
        json.dumps(result)  # JSON-ready
        assert result["split"] == split and result["step"] == 4
        assert result["num_questions"] == _num_questions(split)
        assert 0.0 <= result["vqa_accuracy"] <= 1.0
        per_type = result["vqa_accuracy_per_type"]
        assert set(per_type) <= set(records.QA_TYPES) and per_type
        assert 0.0 <= result["gen_attribute_accuracy"] <= 1.0
        assert result["num_generated"] == 3
        assert result["num_scored_attributes"] >= 1
        assert np.isfinite(result["nelbo_bits_per_token"]) and result["nelbo_bits_per_token"] > 0


@pytest.mark.slow
def test_nelbo_of_a_uniform_predictor_is_log2_k():
    """Zero code heads: every code has logit 0, the ``free`` score is exactly r/K per code, and the
    expected NELBO per token is log2 K (docs/DESIGN.md §6) — the estimate must land near it."""
    from unif2ace_jax.evaluate.unified import nelbo
    from unif2ace_jax.checkpoint.trained import load_trained

    trained = load_trained(unified_env.trained_run())
    params = dict(trained.params)
    # Code logits = the lm head's code rows (+ the per-bit head with image_code_logits=
    # table+bits): all zero -> every code has logit 0.
    for head in ("lm_head", "code_bits_head"):
        if head in params:
            params[head] = jax.tree.map(jnp.zeros_like, params[head])
    trained.params = params
    result = nelbo(trained, "test", samples=60, batch_size=8)
    k = unified_env.build_env()["num_codes"]
    assert result["nelbo_bits_per_token"] == pytest.approx(np.log2(k), rel=0.08)


@pytest.mark.slow
def test_evaluate_cli_prints_one_json_object(tmp_path):
    workdir = unified_env.trained_run()
    proc = unified_env.run_module("unif2ace_jax.evaluate", f"--workdir={workdir}",
                                  "--split=test_heldout_combos", "--num_generate=2",
                                  "--batch_size=8", "--max_questions=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["num_questions"] == 10
    for key in ("vqa_accuracy", "gen_attribute_accuracy", "nelbo_bits_per_token"):
        assert key in result
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.evaluate", f"--workdir={workdir}", "--split=validation"), "validation")


def test_evaluate_cli_missing_workdir(tmp_path):
    unified_env.assert_one_error_line(unified_env.run_module(
        "unif2ace_jax.evaluate", f"--workdir={tmp_path / 'none'}"), "does not exist")

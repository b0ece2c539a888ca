"""`train.loop.check_same_model`: a resumed run must build the model the workdir was made with."""

import json

import ml_collections
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.train.loop import check_same_model


def _config(width: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": {"d_model": width, "ffn": {"name": "dense"}},
                                      "total_steps": 10})


def test_check_same_model(tmp_path):
    path = tmp_path / "run.json"
    check_same_model(str(path), _config(8), "a run")  # a new workdir: nothing to compare
    path.write_text(json.dumps({"config": json.loads(_config(8).to_json())}))
    check_same_model(str(path), _config(8), "a run")
    other = _config(8)
    other.total_steps = 99  # only the model section matters
    check_same_model(str(path), other, "a run")
    with pytest.raises(UserError, match="holds a run with a different model config"):
        check_same_model(str(path), _config(16), "a run")

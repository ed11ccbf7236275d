"""Falcon-H1 with muP multipliers (every Hub checkpoint has them): `mlx_lm convert` folds them
into the weights (its falcon_h1 sanitize) and mlx-lm's model no longer applies them, while
transformers' model applies them in its forward. An MLX checkpoint of such a model must not
load with them applied twice."""

from __future__ import annotations

import pytest
from arch_models import Variant, mlxq_logits, tiny_mlx_checkpoint
from mlxq.inspect_checkpoint import inspect_checkpoint

ARCH = "falcon_h1_mup"
NAMED = r"muP multipliers \(embedding_multiplier, lm_head_multiplier, .*ssm_multipliers\)"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_folded_multipliers_refused_by_name(tied: bool) -> None:
    path = tiny_mlx_checkpoint(ARCH, Variant(tied=tied))
    with pytest.raises(NotImplementedError, match=NAMED):
        mlxq_logits(path, [1, 2, 3])
    errors = [p.message for p in inspect_checkpoint(path, str(path)).errors]
    assert any("folded them into this checkpoint's weights" in e for e in errors), errors

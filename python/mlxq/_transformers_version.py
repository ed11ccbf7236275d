"""The oldest transformers mlxq runs on, checked once transformers is imported.

Older 5.x releases pip would accept under a looser pin load some models whose own modeling
differs from mlx-lm's (different logits, no error) and lack loading internals mlxq hooks, so
they are refused up front, naming the installed and the needed version, instead of failing
deep inside a load or giving a wrong model.
"""

from __future__ import annotations

# The oldest release on which tests/test_moe.py, test_transformers_loading.py,
# test_quantize_on_load.py and test_arch_coverage.py's dense/MoE slice all pass (README lists
# the releases tried). Keep in step with pyproject.toml's dependency.
MIN_TRANSFORMERS = "5.23.0"


def require_supported_transformers(installed: str | None = None) -> None:
    """Raise an ImportError naming both versions when the installed transformers (or
    `installed`) is older than :data:`MIN_TRANSFORMERS`."""
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    if Version(installed) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"mlxq needs transformers>={MIN_TRANSFORMERS}, but transformers {installed} is "
            f"installed: pip install 'transformers>={MIN_TRANSFORMERS}'"
        )

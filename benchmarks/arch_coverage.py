"""Architecture coverage: every dense architecture that transformers 5 and mlx-lm both run.

For each architecture and variant (tied head 4-bit group 64; untied head with the mixed_3_6
recipe, or 3-bit group 32 where the recipe does not apply), a tiny random model is saved by
transformers, converted by `mlx_lm.convert`, and run by mlx-lm (fp32) and by mlxq through
transformers' from_pretrained (fp32). One line per architecture and variant:

    loads, max|logits - mlx-lm|      mlxq runs it (the issue's bar: <= 1e-3)
    refused: <error>                 mlxq (or transformers) refuses it by name
    mlx-lm fails: <error>            mlx-lm cannot convert/run it: no oracle

Usage: python benchmarks/arch_coverage.py [ARCH ...] [--markdown]
Checkpoints are cached under $MLXQ_TEST_CACHE (default ~/.cache/mlxq-tests).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlxq  # noqa: E402,F401  (registers the quantizer)
from arch_models import ARCHS, VARIANTS, Outcome, run_arch  # noqa: E402


def _markdown(outcomes: list[Outcome]) -> str:
    by_arch: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_arch.setdefault(o.arch, []).append(o)
    rows = ["| architecture | tied head, 4-bit g64 | untied head, mixed_3_6 (or 3-bit g32) |"]
    rows.append("|---|---|---|")
    for arch, items in by_arch.items():
        cells = []
        for o in items:
            if o.status == "loads":
                cells.append(f"loads, {o.max_diff:.1e}" + ("" if o.max_diff <= 1e-3 else " (!)"))
            else:
                reason = o.reason.split(":", 1)[-1].strip()[:80].replace("|", "/")
                cells.append(f"{o.status}: {reason}")
        rows.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help=f"default: all {len(ARCHS)}")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown architectures {unknown}; known: {', '.join(ARCHS)}")

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    outcomes = []
    bad = 0
    for arch in args.archs or list(ARCHS):
        for variant in VARIANTS:
            start = time.perf_counter()
            outcome = run_arch(arch, variant)
            outcomes.append(outcome)
            bad += outcome.status == "loads" and outcome.max_diff > 1e-3
            print(f"{outcome.line()}  [{time.perf_counter() - start:.1f}s]", flush=True)
    if args.markdown:
        print()
        print(_markdown(outcomes))
    return 1 if bad else 0  # something loads but gives other logits: a silent error


if __name__ == "__main__":
    sys.exit(main())

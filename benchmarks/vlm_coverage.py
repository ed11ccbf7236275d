"""Image-text coverage: every family that transformers 5 and mlx-vlm both run.

For each family a tiny random model (2 text layers, a 2-block vision tower) is saved by
transformers, converted by `mlx_vlm.convert -q` (4-bit, group 64, untied head; mlx-vlm leaves
the vision tower in float), and run by mlx-vlm (fp32) and by mlxq through transformers'
AutoModelForImageTextToText (fp32), on a text-only prompt and on a prompt with one small
generated image (mlx-vlm's processor output fed to both). One line per family:

    loads, max|logits - mlx-vlm| text, image+text     mlxq runs it (the issue's bar: <= 1e-3)
    refused: <error>                                  mlxq (or transformers) refuses it by name
    mlx-vlm fails: <error>                            mlx-vlm cannot convert/run it: no oracle

With --variants, two more conversions per family: the vision tower quantized too (mlx-vlm's
own rule keeps it float; patched for this), and the mixed_3_6 recipe (3-bit group 32, per-module
entries under mlx-vlm's names).

Usage: python benchmarks/vlm_coverage.py [FAMILY ...] [--markdown] [--variants]
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
from vlm_models import FAMILIES, Outcome, Variant, run_family, variant_of  # noqa: E402

TOLERANCE = 1e-3


def _markdown(outcomes: list[Outcome]) -> str:
    rows = ["| family | variant | text only | image + text |", "|---|---|---|---|"]
    for o in outcomes:
        if o.status == "loads":
            cells = [
                f"loads, {d:.1e}" + ("" if d <= TOLERANCE else " (!)")
                for d in (o.text_diff, o.image_diff)
            ]
        else:
            reason = o.reason.split(":", 1)[-1].strip()[:100].replace("|", "/")
            cells = [f"{o.status}: {reason}", "same"]
        rows.append(f"| {o.name} | {o.variant.tag} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"default: all {len(FAMILIES)}")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--variants", action="store_true", help="quantized vision, mixed_3_6")
    args = parser.parse_args(argv)
    unknown = [a for a in args.families if a not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    outcomes = []
    bad = 0
    runs = []
    for name in args.families or list(FAMILIES):
        base = variant_of(name)
        runs.append((name, base))
        if args.variants:
            runs.append((name, Variant(tied=base.tied, quantize_vision=True)))
            runs.append((name, Variant(tied=base.tied, bits=3, group_size=32, recipe="mixed_3_6")))
    for name, variant in runs:
        start = time.perf_counter()
        outcome = run_family(name, variant)
        outcomes.append(outcome)
        bad += outcome.status == "loads" and max(outcome.text_diff, outcome.image_diff) > TOLERANCE
        print(f"{outcome.line()}  [{time.perf_counter() - start:.1f}s]", flush=True)
    if args.markdown:
        print()
        print(_markdown(outcomes))
    return 1 if bad else 0  # something loads but gives other logits: a silent error


if __name__ == "__main__":
    sys.exit(main())

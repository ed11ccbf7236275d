"""Image-text coverage: every family that transformers 5 and mlx-vlm both run.

For each family a tiny random model (2 text layers, a 2-block vision tower) is saved by
transformers, converted by `mlx_vlm.convert -q` (4-bit, group 64, untied head; mlx-vlm leaves
the vision tower in float), and run by mlx-vlm (fp32) and by mlxq through transformers'
AutoModelForImageTextToText (fp32), on a text-only prompt and on a prompt with one small
generated image (mlx-vlm's processor output fed to both). One line per family:

    loads, max|logits - mlx-vlm| text, image+text     mlxq runs it (the issue's bar: <= 1e-3)
    refused: <error>                                  mlxq (or transformers) refuses it by name
    mlx-vlm fails: <error>                            mlx-vlm cannot convert/run it: no oracle

With --variants, three more conversions per family: the vision tower quantized too (mlx-vlm's
own rule keeps it float; patched for this), the mixed_3_6 recipe (3-bit group 32, per-module
entries under mlx-vlm's names), and a vision tower in mxfp4 (group 32) in an affine 4-bit model
(per-module entries that name vision modules only). The base conversion is also saved by
`save_pretrained` and run by mlx-vlm (the save column: max |diff| of the image + text logits).
Families both have that mlxq refuses by name are listed with the reason.

Usage: python benchmarks/vlm_coverage.py [FAMILY ...] [--markdown] [--variants]
Checkpoints are cached under $MLXQ_TEST_CACHE (default ~/.cache/mlxq-tests).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlxq  # noqa: E402,F401  (registers the quantizer)
from mlxq.integrations.mlx_vlm_layout import UNVERIFIED_VLM  # noqa: E402
from vlm_models import (  # noqa: E402
    FAMILIES,
    VISION_MXFP4,
    Outcome,
    Variant,
    run_family,
    save_round_trip,
    variant_of,
)

TOLERANCE = 1e-3


def _markdown(outcomes: list[Outcome], saves: dict[tuple[str, str], str]) -> str:
    rows = [
        "| family | variant | text only | image + text | save_pretrained -> mlx-vlm |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.status == "loads":
            cells = [
                f"loads, {d:.1e}" + ("" if d <= TOLERANCE else " (!)")
                for d in (o.text_diff, o.image_diff)
            ]
            if FAMILIES[o.name].no_image_oracle:
                cells[1] = f"tile features {o.image_diff:.1e} (no oracle)"
        else:
            reason = o.reason.split(":", 1)[-1].strip()[:100].replace("|", "/")
            cells = [f"{o.status}: {reason}", "same"]
        cells.append(saves.get((o.name, o.variant.tag), ""))
        rows.append(f"| {o.name} | {o.variant.tag} | " + " | ".join(cells) + " |")
    for name, reason in UNVERIFIED_VLM.items():
        rows.append(f"| {name} | | refused by name: {reason} | | |")
    return "\n".join(rows)


def _save(name: str, variant: Variant) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            diff = save_round_trip(name, Path(tmp) / "saved", variant)
        except Exception as e:  # noqa: BLE001 - reported in the table
            return f"fails: {type(e).__name__}: {str(e)[:80]}"
    return f"{diff:.1e}" + ("" if diff <= TOLERANCE else " (!)")


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
            runs.append((name, Variant(tied=base.tied, recipe=VISION_MXFP4)))
    saves: dict[tuple[str, str], str] = {}
    for name, variant in runs:
        start = time.perf_counter()
        outcome = run_family(name, variant)
        outcomes.append(outcome)
        bad += outcome.status == "loads" and max(outcome.text_diff, outcome.image_diff) > TOLERANCE
        save = ""
        if outcome.status == "loads" and variant == variant_of(name):
            save = saves[(name, variant.tag)] = _save(name, variant)
            bad += not save[:1].isdigit() or "(!)" in save
        print(
            f"{outcome.line()}{'  save ' + save if save else ''}  "
            f"[{time.perf_counter() - start:.1f}s]",
            flush=True,
        )
    for name, reason in UNVERIFIED_VLM.items():
        print(f"{name:14s} refused by name: {reason}")
    if args.markdown:
        print()
        print(_markdown(outcomes, saves))
    return 1 if bad else 0  # something loads but gives other logits: a silent error


if __name__ == "__main__":
    sys.exit(main())

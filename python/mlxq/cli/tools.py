"""`mlxq bench` (the benchmark harnesses) and `mlxq doctor` (what this machine can run)."""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> int:
    rest = [a for a in args.rest if a != "--"]
    if args.what == "ops":
        from mlxq.bench.ops import main as ops_main

        ops_main(rest)
    else:
        from mlxq.bench.model import main as model_main

        model_main(rest)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mlxq.doctor import doctor_report

    print(doctor_report())
    return 0

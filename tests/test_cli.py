"""The `mlxq` command line, run as users run it: `python -m mlxq ...` in a subprocess.

Checkpoints come from the session cache (tests/mlx_models.py); nothing is downloaded
(HF_HUB_OFFLINE=1). Oracles: the demo must say "Paris"; `convert` must write exactly the
tensors and config entries that `mlx_lm.convert` wrote for the same float model, and mlx-lm must
load the result; `inspect` must agree with the per-module entries mlx-lm wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from cli_batch import run_cli_batch
from mlx_models import TEST_CACHE, smollm2
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def _cli_environ(**env: str) -> dict[str, str]:
    environ = dict(os.environ, HF_HUB_OFFLINE="1", MLXQ_CACHE=str(TEST_CACHE))
    environ.update(env)
    environ.pop("MLXQ_DEBUG", None)
    return environ


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environ = _cli_environ(**env)
    return subprocess.run(
        [sys.executable, "-m", "mlxq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        cwd=REPO,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one line on stderr naming what is wrong."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mlxq: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def float_checkpoint() -> Path:
    from mlxq.demo_model import cached_smollm2_float_checkpoint

    return cached_smollm2_float_checkpoint(cache_dir=TEST_CACHE)


def test_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "generate", "inspect", "convert", "bench", "doctor"):
        assert command in proc.stdout


@pytest.mark.parametrize("name", ["ops", "model"])
def test_bench_help_names_the_command(name: str, capsys) -> None:
    # `mlxq bench ops -h` printed `usage: __main__.py` (its parser had no prog)
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"mlxq.bench.{name}").main(["-h"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mlxq bench {name} ")


def test_python_m_mlxq_doctor_runs_without_a_warning() -> None:
    # the README's `python -m mlxq.doctor`: `import mlxq` imported mlxq.doctor, so runpy ran it
    # again with "RuntimeWarning: 'mlxq.doctor' found in sys.modules"
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "mlxq.doctor"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.startswith("mlxq doctor")


def test_demo_answers_paris() -> None:
    # builds (once per cache) the 4-bit g32 checkpoint with mlxq's own converter, then chats
    proc = run_cli("demo", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    stats = proc.stdout.strip().splitlines()[-1]
    for field in ("load", "prefill", "decode", "tok/s", "peak memory"):
        assert field in stats, stats


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_checkpoint(ours: Path, reference: Path) -> None:
    a, b = _tensors(ours), _tensors(reference)
    assert sorted(a) == sorted(b)
    for name, tensor in b.items():
        assert a[name].dtype == tensor.dtype, name
        assert torch.equal(a[name], tensor), name
    cfg, ref_cfg = (json.loads((p / "config.json").read_text()) for p in (ours, reference))
    assert cfg["quantization"] == ref_cfg["quantization"]
    assert cfg["rope_theta"] == ref_cfg["rope_theta"]


def test_demo_checkpoint_is_what_mlx_lm_convert_makes(smollm2_4bit_g32: Path) -> None:
    from mlxq.cli import demo_checkpoint

    # built by mlxq (transformers + mlxq.convert), compared with mlx_lm.convert's output
    _assert_same_checkpoint(demo_checkpoint(str(TEST_CACHE)), smollm2_4bit_g32)


def test_generate_applies_the_chat_template_by_default(smollm2_4bit_g32: Path) -> None:
    # as mlx_lm.generate: an instruct model answers without extra flags
    args = ["generate", "--model", str(smollm2_4bit_g32), "--max-tokens", "12"]
    proc = run_cli(*args, "--prompt", "What is the capital of France?", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "cpu bfloat16" in proc.stdout
    templated = re.search(r"prefill (\d+) tokens", proc.stdout)
    raw = run_cli(*args, "--prompt", "What is the capital of France?", "--ignore-chat-template")
    assert raw.returncode == 0, raw.stderr
    sent = re.search(r"prefill (\d+) tokens", raw.stdout)
    assert templated and sent and int(sent.group(1)) < int(templated.group(1)) - 10


def test_generate_refuses_a_prompt_of_no_tokens(smollm2_4bit_g32: Path) -> None:
    # an empty sequence would fail deep inside the model (a reshape of 0 elements)
    args = ["generate", "--model", str(smollm2_4bit_g32), "--max-tokens", "4"]
    proc = run_cli(*args, "--prompt", "", "--ignore-chat-template")
    assert proc.returncode != 0
    assert "encodes to no tokens" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_help_says_which_prompt_is_sent() -> None:
    proc = run_cli("generate", "-h")
    assert "--ignore-chat-template" in proc.stdout and "chat template" in proc.stdout


# (argv, exit status, words the error line must contain); {tmp}, {file}, {ckpt}, {float} are
# filled in. Exit 2 is argparse's (usage, then an error line), 1 is mlxq's one-line error.
ERROR_CASES = {
    "generate-no-folder": (["generate", "--model", "/no/such/folder"], 1, ["no such folder"]),
    "generate-relative": (["generate", "--model", "./missing-model"], 1, ["no such folder"]),
    "inspect-no-folder": (["inspect", "/no/such/folder"], 1, ["no such folder"]),
    "inspect-offline-repo": (
        ["inspect", "mlx-community/no-such-model-xyz"],
        1,
        ["not in the Hub cache", "OFFLINE"],
    ),
    "generate-offline-repo": (
        ["generate", "--model", "mlx-community/no-such-model-xyz"],
        1,
        ["not in the Hub cache"],
    ),
    "generate-bad-id": (["generate", "--model", "bad repo id!"], 1, ["no such folder"]),
    "generate-no-config": (["generate", "--model", "{tmp}"], 1, ["has no config.json"]),
    "inspect-file": (["inspect", "{file}"], 1, ["is a file"]),
    # with --json, also a JSON object on stdout (before: stdout empty)
    "inspect-json-no-folder": (["inspect", "/no/such/folder", "--json"], 1, ["no such folder"]),
    "inspect-json-not-a-model": (["inspect", "{tmp}", "--json"], 1, ["has no config.json"]),
    "generate-zero-tokens": (["generate", "--model", "{ckpt}", "--max-tokens", "0"], 1, ["--max"]),
    "demo-negative-tokens": (["demo", "--max-tokens", "-3"], 1, ["--max-tokens"]),
    # before: a negative or NaN temperature decoded greedily, --threads 0 was ignored
    "generate-negative-temperature": (
        ["generate", "--model", "{ckpt}", "--temperature", "-1"],
        1,
        ["--temperature", "-1"],
    ),
    "generate-nan-temperature": (
        ["generate", "--model", "{ckpt}", "--temperature", "nan"],
        1,
        ["--temperature", "nan"],
    ),
    "demo-zero-threads": (["demo", "--threads", "0"], 1, ["--threads", "0"]),
    "generate-float-model": (
        ["generate", "--model", "{float}"],
        1,
        ["float checkpoint", "mlxq convert"],
    ),
    "generate-mps-missing": (["generate", "--model", "{ckpt}", "--device", "mps"], 1, ["MPS"]),
    "convert-quantized-input": (["convert", "{ckpt}", "{tmp}/new"], 1, ["already quantized"]),
    "convert-existing-output": (["convert", "{float}", "{tmp}"], 1, ["already exists"]),
    # before: "(Couldn't instantiate the backend tokenizer from one of: )", naming nothing
    "generate-no-tokenizer": (
        ["generate", "--model", "{notok}", "--max-tokens", "1"],
        1,
        ["tokenizer", "none of tokenizer.json"],
    ),
    # before: "[Errno 17] File exists", after reading the whole model
    "convert-output-under-a-file": (
        ["convert", "{float}", "{file}/out"],
        1,
        ["weights.bin is a file", "cannot be created"],
    ),
    "argparse-no-model": (["generate"], 2, ["--model"]),
    "argparse-bad-device": (["generate", "--model", "x", "--device", "tpu"], 2, ["tpu"]),
    "argparse-bad-bits": (["convert", "a", "b", "--bits", "7"], 2, ["--bits"]),
    "argparse-bad-recipe": (["convert", "a", "b", "--recipe", "mixed_9_9"], 2, ["--recipe"]),
    "argparse-bad-command": (["frobnicate"], 2, ["frobnicate"]),
    "argparse-bad-bench": (["bench", "kernels"], 2, ["kernels"]),
}


# A process each for the command lines that import huggingface_hub or transformers before they
# fail: a warning of theirs shown once per process would show for the first of them only in a
# shared one (tests/cli_batch.py), and `assert_one_line_error` counts every line. The others
# (24: argparse, paths, flags, the float-model and MPS checks) fail before importing anything
# past mlxq (measured per command line: sys.modules after main) and share one process.
OWN_PROCESS = ("inspect-offline-repo", "generate-offline-repo", "generate-no-tokenizer")


def run_many(argvs: dict[str, list[str]], jobs: int = 4) -> dict[str, subprocess.CompletedProcess]:
    """Run `python -m mlxq ARGV` for each entry, `jobs` at a time (each mostly imports torch)."""
    environ = _cli_environ()
    out: dict[str, subprocess.CompletedProcess] = {}
    pending = list(argvs.items())
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "mlxq", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environ,
                cwd=REPO,
            )
            for name, argv in batch
        }
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def error_runs(
    tmp_path_factory: pytest.TempPathFactory, smollm2_4bit_g32: Path, float_checkpoint: Path
) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "weights.bin").write_bytes(b"x")
    no_tokenizer = tmp_path_factory.mktemp("no-tokenizer")  # the model's files, linked
    for f in smollm2_4bit_g32.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (no_tokenizer / f.name).symlink_to(f)
    subs = {
        "{notok}": str(no_tokenizer),
        "{tmp}": str(tmp),
        "{file}": str(tmp / "weights.bin"),
        "{ckpt}": str(smollm2_4bit_g32),
        "{float}": str(float_checkpoint),
    }

    def fill(arg: str) -> str:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        return arg

    argvs = {name: [fill(a) for a in case[0]] for name, case in ERROR_CASES.items()}
    shared = {name: argv for name, argv in argvs.items() if name not in OWN_PROCESS}
    with ThreadPoolExecutor(1) as pool:  # the shared process beside the others
        batch = pool.submit(run_cli_batch, shared, _cli_environ())
        own = run_many({name: argvs[name] for name in OWN_PROCESS})
        return {**batch.result(), **own}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gives_one_line(case: str, error_runs: dict) -> None:
    _, status, needles = ERROR_CASES[case]
    if case == "generate-mps-missing" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS (the error path is for machines without it)")
    proc = error_runs[case]
    if status == 1:
        assert_one_line_error(proc, *needles)
    else:  # argparse: usage, then one error line; no traceback
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("mlxq") and "error:" in last
        for needle in needles:
            assert needle in last, last


@pytest.mark.parametrize("case", [c for c in ERROR_CASES if "--json" in ERROR_CASES[c][0]])
def test_json_error_is_json(case: str, error_runs: dict) -> None:
    # scripts parse stdout: a failed `inspect --json` prints the error as JSON there too
    proc = error_runs[case]
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["error"] in proc.stderr
    assert report["problems"] == [{"severity": "error", "message": report["error"]}]
    assert all(needle in report["error"] for needle in ERROR_CASES[case][2])


def _mixed_entries(config: dict) -> dict[str, int]:
    q = config["quantization"]
    return {k: v["bits"] for k, v in q.items() if isinstance(v, dict)}


def test_inspect_mixed_recipe_agrees_with_mlx_lm_config() -> None:
    path = smollm2(4, 64, "mixed_3_6")
    proc = run_cli("inspect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    want = _mixed_entries(json.loads((path / "config.json").read_text()))
    got = {m["name"]: m["bits"] for m in report["modules"] if m["bits"] and m["bytes"]}
    assert got == want  # every quantized module, with the bits mlx-lm wrote for it
    assert {3, 6} == set(got.values())
    assert report["problems"] == []
    # the readable form merges layers: v_proj of the layers mlx-lm kept at 6 bits in one row
    text = run_cli("inspect", str(path)).stdout
    six = sorted(int(k.split(".")[2]) for k, b in want.items() if "v_proj" in k and b == 6)
    assert six == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    row = next(line for line in text.splitlines() if "{0-2,5,8,11,14,17,20,23,26-29}" in line)
    assert "self_attn.v_proj" in row and "6-bit g64" in row and " 14 " in row
    assert "problems     none" in text


def test_inspect_reports_stale_index_and_broken_layer(
    smollm2_4bit_g32: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(smollm2_4bit_g32, model)
    # a stale index (as many mlx-community repos carry): loads, with a warning
    index = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = run_cli("inspect", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stdout and "stale" in proc.stdout
    assert "4-bit g32" in proc.stdout

    # a layer without its biases: inspect names it and fails; generate says so in one line
    (model / "model.safetensors.index.json").unlink()
    file = model / "model.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    del tensors["model.layers.3.mlp.down_proj.biases"]
    save_file(tensors, file, metadata=metadata)
    proc = run_cli("inspect", str(model))
    assert proc.returncode == 1
    assert "error: layer 'model.layers.3.mlp.down_proj'" in proc.stdout
    assert "biases" in proc.stdout
    proc = run_cli("generate", "--model", str(model), "--max-tokens", "2")
    assert_one_line_error(proc, "model.layers.3.mlp.down_proj", "biases")


@pytest.mark.parametrize(
    ("recipe", "group_size"), [("mixed_3_6", 64), ("mixed_4_6", None)], ids=["g64", "g-null"]
)
def test_convert_mixed_recipe_matches_mlx_lm_convert(
    float_checkpoint: Path, tmp_path: Path, recipe: str, group_size: int | None
) -> None:
    out = tmp_path / "out"
    args = ["convert", str(float_checkpoint), str(out), "--recipe", recipe]
    if group_size:
        args += ["--group-size", str(group_size)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    # made by mlx_lm.convert (no --q-group-size: entries say "group_size": null)
    _assert_same_checkpoint(out, smollm2(4, group_size, recipe))
    from mlx_lm import load

    load(str(out))  # and mlx-lm loads what we wrote


def test_bench_ops(tmp_path: Path) -> None:
    out = tmp_path / "ops"
    proc = run_cli(
        "bench", "ops", "--m", "1", "--bits", "4", "--shapes", "4096x4096", "--peers", "dense",
        "--budget", "0.05", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["mlxq_fp32"] > 0 and rows[0]["dense_fp32"] > 0


def test_bench_writes_into_the_cache_by_default(tmp_path: Path) -> None:
    # never into the current folder (mlxq may be installed anywhere): the cache, or --out
    args = ["--m", "1", "--bits", "4", "--shapes", "4096x4096", "--peers", "dense"]
    proc = run_cli("bench", "ops", *args, "--budget", "0.01", MLXQ_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bench" / "ops.json").is_file()
    assert f"json: {tmp_path / 'bench' / 'ops.json'}" in proc.stdout


def test_bench_model(tmp_path: Path) -> None:
    # the tiny Llama (tests/arch_models.py), 4-bit and its bf16 float model: the same runs as
    # on SmolLM2-135M, whose mlx_lm forwards took ~3 s each on the 2-core VM (131 s -> 28 s)
    from arch_models import VARIANTS, tiny_float_checkpoint, tiny_mlx_checkpoint

    model = tiny_mlx_checkpoint("llama", VARIANTS[0])
    float_model = tiny_float_checkpoint("llama", tmp_path / "float", VARIANTS[0].tied)
    out = tmp_path / "model"
    proc = run_cli(
        "bench", "model", "--model", str(model), "--float-model",
        str(float_model), "--peers", "mlxq", "mlx_lm", "--prompt-tokens",
        "16", "--decode-tokens", "4", "--mlx-prompt-tokens", "4", "--mlx-decode-tokens", "2",
        "--reps", "2", "--rounds", "2", "--busy", "1", "--out", str(out),
        "--interleave", "3", "--interleave-peers", "mlxq", "dense_bf16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.with_suffix(".json").read_text())
    results = payload["results"]
    assert set(results) == {"mlxq", "mlx_lm", "limit"}, results
    limit = results.pop("limit")
    assert limit["decode_tps"] > 0 and "MB/token" in limit["note"]
    for peer, r in results.items():
        assert "error" not in r, (peer, r)
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["peak_rss"] > 0
        assert r["loaded_decode_tps"] > 0, peer  # decoded again beside a busy process
        # the quiet rate is the median of --reps runs of every one of the --rounds rounds
        runs = r["decode_tps_runs"]
        assert len(runs) == 4 and r["rounds"] == 2, (peer, r)
        assert r["decode_tps"] == pytest.approx(statistics.median(runs)), (peer, r)
    assert results["mlxq"]["prefill_tokens"] == 16 and results["mlxq"]["decode_tokens"] == 4
    assert results["mlx_lm"]["prefill_tokens"] == 4 and results["mlx_lm"]["decode_tokens"] == 2
    ratio = payload["targets"]["decode_vs_mlx_lm"]["ratio"]
    assert ratio == pytest.approx(results["mlxq"]["decode_tps"] / results["mlx_lm"]["decode_tps"])
    assert "| mlxq |" in proc.stdout and "| limit |" in proc.stdout
    # titled by the checkpoint benchmarked (it said SmolLM2-135M-Instruct whatever --model was)
    assert f"# {model.name} (llama, 4-bit affine, group 64) whole-model" in proc.stdout
    assert "SmolLM2" not in proc.stdout and payload["info"]["label"].startswith(model.name)
    # the two peers of --interleave decoded alternating in one process, 3 rounds
    inter = payload["interleaved"]
    assert inter["peers"] == ["mlxq", "dense_bf16"] and inter["rounds"] == 3, inter
    a, b = inter["median_tps"]
    assert a > 0 and b > 0 and inter["ratio"] == pytest.approx(a / b)
    assert inter["round_ratio_min"] <= inter["round_ratio_max"]
    assert [len(inter["decode_tps_runs"][p]) for p in inter["peers"]] == [3, 3]
    assert "decode alternating in one process (3 rounds, 4 tokens after 16)" in proc.stdout


def test_bench_model_labels_and_verdicts(tmp_path: Path) -> None:
    # the title follows --model; on CUDA no verdict of the CPU targets (a 135M model on an H200
    # printed "decode_vs_limit: 0.00x ... NOT met"), and the line says why
    from mlxq.bench.model import NO_CUDA_TARGETS, TARGETS, model_label, ratios, verdict_lines

    quant = {"bits": 2, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": 8}}
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen3", "quantization": quant})
    )
    assert model_label(tmp_path) == f"{tmp_path.name} (qwen3, 2-bit affine, group 64, mixed)"
    assert model_label(tmp_path, default=True).startswith("SmolLM2-135M-Instruct (qwen3, ")
    nvfp4 = {"model_type": "llama", "quantization_config": {"bits": 4, "mode": "nvfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(nvfp4))
    assert model_label(tmp_path) == f"{tmp_path.name} (llama, 4-bit nvfp4)"
    assert model_label(tmp_path / "absent") == "absent"

    run = {"prefill_tps": 100.0, "decode_tps": 20.0, "loaded_decode_tps": 15.0}
    results = {peer: dict(run) for peer in ("mlxq", "mlxq_bf16", "dense_bf16")}
    results["limit"] = {"decode_tps": 1e5}
    cpu = ratios(results)
    assert set(cpu) == {n for n, (a, b, _, _) in TARGETS.items() if {a, b} <= set(results)}
    assert cpu["decode_vs_limit"] == {"ratio": 2e-4, "target": 0.5, "met": False}
    lines = verdict_lines(cpu)
    assert "decode_vs_limit: 0.00x (target >= 0.5x) NOT met" in lines
    assert "prefill_vs_dense_bf16: 1.00x (target >= 1.0x) met" in lines
    assert ratios(results, "cuda") == {}
    assert verdict_lines(cpu, "cuda") == [f"targets: {NO_CUDA_TARGETS}"]
    assert "CPU" in NO_CUDA_TARGETS


def test_bench_rounds_pool_runs_and_keep_errors() -> None:
    from mlxq.bench.model import merge_rounds

    a = {
        "decode_tps_runs": [10.0, 30.0],
        "decode_tps": 20.0,
        "prefill_tps": 100.0,
        "loaded_decode_tps": 5.0,
        "load_s": 1.0,
        "peak_rss": 7,
        "prefill_tokens": 16,
    }
    b = {"decode_tps_runs": [12.0, 14.0], "decode_tps": 13.0, "prefill_tps": 300.0,
         "loaded_decode_tps": 9.0, "load_s": 3.0, "peak_rss": 9, "prefill_tokens": 16}  # fmt: skip
    merged = merge_rounds([a, b])
    assert merged["decode_tps_runs"] == [10.0, 30.0, 12.0, 14.0]
    assert merged["decode_tps"] == 13.0  # the median of the pooled runs, not of the medians
    assert merged["prefill_tps"] == 200.0 and merged["loaded_decode_tps"] == 7.0
    assert merged["peak_rss"] == 9 and merged["rounds"] == 2 and merged["prefill_tokens"] == 16
    assert "compile_s" not in merged
    assert merge_rounds([a, {"error": "boom"}]) == {"error": "boom"}


def test_cuda_bench_shapes_and_env_columns() -> None:
    # the CUDA op benchmark's parsing, on any machine: shapes "NxK" beyond its table, columns
    # timed with environment variables set, and where the table puts them
    from mlxq.bench.ops_cuda import format_table, parse_env_variants, shape_of

    assert shape_of("14336x4096") == (14336, 4096) and shape_of("3584X18944") == (3584, 18944)
    for bad in ("4096", "4096x", "ax4096"):
        with pytest.raises(ValueError):
            shape_of(bad)
    got = parse_env_variants(["t1:MLXQ_CUDA_BULK_TILES=1", "l:A=1,B=x=y"])
    assert got == {"t1": {"MLXQ_CUDA_BULK_TILES": "1"}, "l": {"A": "1", "B": "x=y"}}
    for bad in ("noname", ":A=1", "n:A", "n:=1"):
        with pytest.raises(ValueError):
            parse_env_variants([bad])
    row = {"N": 4096, "K": 4096, "bits": 4, "group_size": 128, "M": 1, "mlxq_bf16": 0.007}
    row |= {"mlxq_t1": 0.005, "t1_vs_default": 1.4, "mlxq_prev": 0.008}
    header, _, cells = format_table([row]).splitlines()
    assert "mlxq_bf16 | mlxq_fp32 | mlxq_t1 | t1_vs_default | mlxq_prev" in header
    assert "0.0070 |  | 0.0050 | 1.4000 | 0.0080" in cells


def test_bytes_per_token_counts_the_tied_head_once(smollm2_4bit_g32: Path) -> None:
    from mlxq.bench.model import bytes_per_token

    files = sum(f.stat().st_size for f in smollm2_4bit_g32.glob("*.safetensors"))
    # SmolLM2 ties its head to the embedding: every tensor is read once per token
    assert 0.99 * files < bytes_per_token(smollm2_4bit_g32) <= files


def test_doctor() -> None:
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout
    for key in ("cpu_isa", "cpu_threaded", "transformers_version", "mlx-lm_version", "cache"):
        assert key in proc.stdout, key


@pytest.mark.parametrize(("arch", "capped"), [("llama", False), ("gpt2", True)])
def test_generate_past_the_context_length_says_so(arch: str, capped: bool) -> None:
    # tiny models of 256 positions, asked for more: never silent. A rotary model (Llama) runs
    # past it as mlx_lm generate does, with a warning; GPT-2's learned positions (`wpe`) end
    # there: capped with a warning (before: no word for Llama, and for GPT-2 an IndexError
    # after 254 tokens)
    from arch_models import VARIANTS, tiny_mlx_checkpoint

    path = tiny_mlx_checkpoint(arch, VARIANTS[1 if arch == "llama" else 0])
    proc = run_cli(
        "generate", "--model", str(path), "--max-tokens", "260", "--ignore-chat-template",
        "--prompt", "hello there", "--temperature", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("mlxq: warning:")]
    assert len(warning) == 1 and "past the model's context length" in warning[0], proc.stderr
    assert "make 262 tokens" in warning[0] and "max_position_embeddings: 256" in warning[0]
    assert ("generating 254 tokens" in warning[0]) == capped
    if capped:
        assert "decode 254 tokens" in proc.stdout

"""README.md's examples, run as a new user copies them, with their results checked.

Every fenced block of README.md is listed in FENCES with the test that runs or checks it, so that
a block added, removed or rewritten from its first line fails `test_every_fence_is_known` until
a test covers it. The Python blocks run in-process, each in a fresh namespace (a block that
continues the one before it, as "Every MLX quantization mode" continues "Using the ops", runs in
that block's namespace), compiled under README.md's own line numbers so that a traceback points
at the README line. Their outputs are held to independent oracles: MLX's `mx.quantize` /
`mx.dequantize`, float64 products, mlx-lm for the adapters and the fused checkpoint.

Nothing is downloaded. What a block names but cannot have here is substituted, each in one
place and asserted to still be in the block (so that an edited README fails here instead of
silently running something else):

- Using models (transformers): `"mlx-community/SmolLM2-135M-Instruct-4bit"` -> the suite's
  cached SmolLM2-135M-Instruct, 4-bit group 32, converted by mlx-lm (`mlx_models.smollm2`).
- Fine-tuning with PEFT: `path` (that Hub id) -> the suite's tiny Qwen3, 4-bit group 64
  (`mlx_models.tiny_mlx_checkpoint`; 20 steps of SmolLM2 would take half a minute); `batch`
  and `labels` (never defined) -> one tokenized sentence and its tokens; `base_model` -> the
  same checkpoint loaded in fp32; the folder `"adapters_from_mlx_lm"` -> adapters written by
  mlx-lm's own LoRA layers (`linear_to_lora_layers`, random `lora_b`).
- First use (macOS): `device="mps"` -> `device="cpu"` where MPS is missing: the same calls,
  so their arguments (affine_matmul's default group size and bits) are still checked.

The shell blocks: the two quick-start commands are what `.ci/run` runs verbatim in a fresh clone
(checked here: markers, one line each, the extras they name); `mlxq demo` and `mlxq doctor` run
through the CLI (one process, tests/cli_batch.py) and their output is held to the README's
example; `python benchmarks/bench_ops.py` runs with a one-cell selection of its own flags; the
macOS install block is not run (it installs packages). The command-line table and every inline
`mlxq ...` command line are checked against the commands' own parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_models import TEST_CACHE, smollm2, tiny_mlx_checkpoint, write_mlx_lm_adapters
from oracles import assert_within, fp_dequantize_ref, matmul_tolerance, weight_refs, words

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclass(frozen=True)
class Fence:
    heading: str  # the nearest heading above the block, without its #s
    lang: str  # the info string after ``` ("" for none)
    text: str  # the block's lines, without the fences
    line: int  # README line of the block's first line (1-based)

    @property
    def key(self) -> tuple[str, str, str]:
        first = self.text.splitlines()[0] if self.text.strip() else ""
        return (self.heading, self.lang, " ".join(first.split())[:40])


def readme_fences() -> list[Fence]:
    """Every ``` block of README.md, in order."""
    fences, heading, lang, start, body = [], "", None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if lang is None:
            if m := re.fullmatch(r"```(\S*)\s*", line):
                lang, start, body = m.group(1), number + 1, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.rstrip() == "```":
            fences.append(Fence(heading, lang, "\n".join(body) + "\n", start))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"README.md: the ``` block opened at line {start} is never closed"
    return fences


# Every block of README.md -> the test that runs or checks it. A new block (or one whose
# section, language or first line changed) fails test_every_fence_is_known: give it a test.
FENCES = {
    (
        "Quick start",
        "bash",
        "python3 -m venv .venv && . .venv/bin/act",
    ): "test_quickstart_is_what_ci_runs",
    (
        "Quick start",
        "bash",
        ". .venv/bin/activate && pip install --no",
    ): "test_quickstart_is_what_ci_runs",
    ("Using the ops", "python", "import torch, mlxq"): "test_ops_and_modes_examples",
    (
        "Every MLX quantization mode",
        "python",
        'wq, scales = mlxq.quantize(w, mode="mxfp',
    ): "test_ops_and_modes_examples",
    (
        "Using models (transformers)",
        "python",
        "import mlxq # registers the MLX quantize",
    ): "test_transformers_example",
    (
        "Fine-tuning with PEFT (LoRA), and back to mlx-lm",
        "python",
        "import mlxq, peft, torch",
    ): "test_peft_example",
    ("Command line", "console", "$ mlxq demo"): "test_demo_and_doctor_examples",
    ("Install on macOS", "sh", "pip install torch"): "test_macos_install_is_not_run",
    ("First use", "python", "import torch, mlxq"): "test_first_use_example",
    (
        "Reporting a Metal problem",
        "sh",
        "mlxq doctor # or: python -m mlxq.doctor",
    ): "test_demo_and_doctor_examples",
    ("Layout", "", "csrc/ op schemas (ops.cpp), argument che"): "test_layout_names_existing_files",
    ("Benchmarks", "bash", "python benchmarks/bench_ops.py # affine_"): "test_benchmarks_example",
}


def fence(test: str, lang: str | None = None, heading: str | None = None) -> Fence:
    """The one README block that FENCES gives to `test` (of that language / section)."""
    found = [
        f
        for f in readme_fences()
        if FENCES.get(f.key) == test
        and (lang is None or f.lang == lang)
        and (heading is None or f.heading == heading)
    ]
    assert len(found) == 1, f"{test}: {len(found)} README blocks, expected one"
    return found[0]


def part(f: Fence, start: str | None, stop: str | None) -> Fence:
    """The lines of `f` from the first that starts with `start` (None: the first line) up to
    the one that starts with `stop` (None: to the end), to check what they did before the rest
    runs."""
    lines = f.text.splitlines()
    a = 0 if start is None else next(i for i, s in enumerate(lines) if s.startswith(start))
    b = len(lines) if stop is None else next(i for i, s in enumerate(lines) if s.startswith(stop))
    return Fence(f.heading, f.lang, "\n".join(lines[a:b]) + "\n", f.line + a)


def run_fence(f: Fence, ns: dict, substitutions: dict[str, str] | None = None) -> dict:
    """exec the block in `ns` after the substitutions (each must still be in the block), compiled
    as README.md at the block's own lines."""
    src = f.text
    for old, new in (substitutions or {}).items():
        assert old in src, f"README block at line {f.line} no longer has {old!r}: update the test"
        assert "\n" not in new
        src = src.replace(old, new)
    exec(compile("\n" * (f.line - 1) + src, str(README), "exec"), ns)
    return ns


def test_every_fence_is_known() -> None:
    keys = [f.key for f in readme_fences()]
    assert len(keys) == len(set(keys)), "two README blocks share a section and first line"
    new = [k for k in keys if k not in FENCES]
    gone = [k for k in FENCES if k not in keys]
    assert not new, f"README blocks without a test here (add them to FENCES): {new}"
    assert not gone, f"FENCES lists blocks README.md no longer has: {gone}"
    for test in set(FENCES.values()):
        assert callable(globals().get(test)), test


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- Quick start ------------------------------------------------------------------------------


def test_quickstart_is_what_ci_runs() -> None:
    """.ci/run reads each quick-start command from between its markers, as the single line of
    a ```bash block, and runs it in a fresh clone; here: that shape, and what the commands name."""
    text = README.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    for name in ("demo", "test"):
        m = re.search(
            rf"<!-- quickstart:{name} -->\n```bash\n([^\n]+)\n```\n<!-- /quickstart:{name} -->",
            text,
        )
        assert m, f"README.md: quickstart:{name} is not one line in a ```bash block"
        assert f"run_quickstart {name}" in ci
        command = m.group(1)
        assert command in [f.text.strip() for f in readme_fences() if f.heading == "Quick start"]
        for extra in re.findall(r'-e "\.\[(\w+)\]"', command):
            assert re.search(rf"^{extra} = \[", extras, re.M), f"no extra [{extra}]"
    assert '\nmlxq = "mlxq.cli:main"\n' in pyproject  # `... && mlxq demo`
    assert "Python >= 3.10" in text and 'requires-python = ">=3.10"' in pyproject


# --- Using the ops, Every MLX quantization mode ------------------------------------------------


# Output columns held to float64 (every 8th of 4096: unpacking all 16M weights in float64 would
# cost seconds for no more coverage of what the README's lines call)
ROWS = slice(None, None, 8)


def _assert_affine_product(y, x, wq, scales, biases, what: str) -> None:
    """y = x @ W.T (group 64, 4 bits) with fp32 dequantize and sums, rounded once to y's
    dtype: within matmul_tolerance of the float64 product."""
    w, w_abs = weight_refs(wq[ROWS], scales[ROWS], biases[ROWS], 64, 4)
    ref, ref_abs = x.double() @ w.T, x.double().abs() @ w_abs.T
    tol = matmul_tolerance(ref_abs, ref, x.shape[-1], y.dtype)
    assert_within(y[..., ROWS], ref, tol, what)


def test_ops_and_modes_examples() -> None:
    import mlx.core as mx
    from oracles import to_mx

    ns = run_fence(fence("test_ops_and_modes_examples", heading="Using the ops"), {})
    w, x, wq, scales, biases, y, w_back = (
        ns[k] for k in ("w", "x", "wq", "scales", "biases", "y", "w_back")
    )
    # `# == mx.quantize`, and the README's bullet: wq is torch.uint32
    assert wq.dtype == torch.uint32 and wq.shape == (4096, 512)
    assert scales.dtype == biases.dtype == torch.float32 and scales.shape == (4096, 64)
    # (MLX on every 8th row: its CPU quantizer takes seconds on all 16M values; rows are
    # quantized independently, so a row's codes do not depend on the others)
    wr = to_mx(w[ROWS])
    mq, ms, mb = mx.quantize(wr, group_size=64, bits=4)
    assert np.array_equal(words(wq[ROWS]), np.array(mq))
    assert np.array_equal(scales[ROWS].numpy(), np.array(ms))
    assert np.array_equal(biases[ROWS].numpy(), np.array(mb))
    # x @ W.T: the output in x's dtype, fp32 dequantize and accumulate (float64 reference)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 4096)
    _assert_affine_product(y, x, wq, scales.bfloat16(), biases.bfloat16(), "README's y")
    # w_back is mx.dequantize bit for bit, and close to w: within a step of its group's grid
    # (MLX shifts the grid so that 0 is a level, which can cost the far end of a group up to a
    # step), a quarter of a step on average (rounding to nearest)
    assert w_back.dtype == torch.float32
    assert np.array_equal(w_back[ROWS].numpy(), np.array(mx.dequantize(mq, ms, mb, 64, 4)))
    steps = (w_back - w).abs() / scales.abs().repeat_interleave(64, dim=1)
    assert float(steps.max()) <= 1 + 1e-3 and 0.2 < float(steps.mean()) < 0.3, steps.mean()

    # "Every MLX quantization mode" continues with the same w and x
    run_fence(fence("test_ops_and_modes_examples", heading="Every MLX quantization mode"), ns)
    mq, ms = mx.quantize(wr, mode="mxfp4")  # the block's first line, by MLX
    assert ns["w_back"].dtype == torch.bfloat16  # "bfloat16 by default, as in MLX"
    theirs = mx.dequantize(mq, ms, mode="mxfp4")
    assert theirs.dtype == mx.bfloat16
    assert torch.equal(
        ns["w_back"][ROWS].float(), torch.from_numpy(np.array(theirs.astype(mx.float32)))
    )
    # y = x @ W.T with W decoded exactly, fp32 sums, rounded once to bf16
    mq_t = torch.from_numpy(np.array(mq).view(np.int32)).view(torch.uint32)
    w64 = fp_dequantize_ref(mq_t, torch.from_numpy(np.array(ms)), "mxfp4")
    ref = x.double() @ w64.T
    tol = matmul_tolerance(x.double().abs() @ w64.abs().T, ref, 4096, torch.bfloat16)
    assert ns["y"].dtype == torch.bfloat16 and ns["y"].shape == (1, 4096)
    assert_within(ns["y"][:, ROWS], ref, tol, "README's mxfp4 y")
    # the last line: nvfp4 with a global scale, bit for bit mx.quantize
    nq, ns_ = mx.quantize(wr, mode="nvfp4", global_scale=mx.array(2.0))
    assert np.array_equal(words(ns["wq"][ROWS]), np.array(nq))
    assert ns["scales"].dtype == torch.uint8
    assert np.array_equal(ns["scales"][ROWS].numpy(), np.array(ns_))


# --- First use (macOS) ------------------------------------------------------------------------


def test_first_use_example() -> None:
    """On a Mac the block runs as written; elsewhere on the CPU: the same calls, so that its
    arguments (affine_matmul's default group size and bits) are still checked."""
    f = fence("test_first_use_example")
    mps = torch.backends.mps.is_available()
    torch.manual_seed(1234)
    ns = run_fence(f, {}, None if mps else {'device="mps"': 'device="cpu"'})
    torch.manual_seed(1234)  # replay the block's draws: w, then the x passed inline
    device = "mps" if mps else "cpu"
    w = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16).cpu()
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16).cpu()
    assert torch.equal(ns["w"].cpu(), w)
    wq, scales, biases, y = (ns[k].cpu() for k in ("wq", "scales", "biases", "y"))
    assert wq.dtype == torch.uint32 and scales.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and y.shape == (1, 4096)
    _assert_affine_product(y, x, wq, scales, biases, "First use y")


# --- Using models (transformers) --------------------------------------------------------------

HUB_ID = '"mlx-community/SmolLM2-135M-Instruct-4bit"'


def test_transformers_example() -> None:
    from mlxq.nn import AffineEmbedding, AffineLinear

    path = smollm2(4, 32)
    ns = run_fence(fence("test_transformers_example"), {}, {HUB_ID: repr(str(path))})
    model, tok = ns["model"], ns["tok"]
    # "quantized layers stay quantized": every projection of the 30 layers, packed
    linears = [m for m in model.modules() if isinstance(m, AffineLinear)]
    assert len(linears) == 30 * 7 and all(m.weight.dtype == torch.uint32 for m in linears)
    assert isinstance(model.get_input_embeddings(), AffineEmbedding)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert tok.decode(int(logits[0, -1].argmax())).strip() == "Paris"


# --- Fine-tuning with PEFT --------------------------------------------------------------------


def _mlx_logits(model, tokens: torch.Tensor) -> np.ndarray:
    import mlx.core as mx

    model.set_dtype(mx.float32)
    out = model(mx.array(tokens.numpy().astype(np.int32))[None])[0]
    return np.array(out.astype(mx.float32))


def _torch_logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float().numpy()


def _loss(logits: np.ndarray, tokens: torch.Tensor) -> float:
    """Next-token cross entropy, as transformers' `labels=` computes it."""
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]), tokens[1:]))


def test_peft_example(tmp_path, monkeypatch, one_thread) -> None:
    pytest.importorskip("peft")
    from mlx_lm import load
    from mlx_lm.utils import load_model
    from mlxq.nn import AffineLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_mlx_checkpoint("qwen3", 4, 64)
    monkeypatch.chdir(tmp_path)  # the block writes ./adapters and ./fused
    write_mlx_lm_adapters(
        ckpt, tmp_path / "adapters_from_mlx_lm", 2, ["self_attn.q_proj", "mlp.down_proj"], 5.0, 5
    )
    tok = AutoTokenizer.from_pretrained(ckpt)
    batch = dict(
        tok(["The mlxq project runs MLX-quantized models inside PyTorch."], return_tensors="pt")
    )
    tokens = batch["input_ids"][0]
    base_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    base_logits = _torch_logits(base_model, tokens)
    preamble = {"path": str(ckpt), "batch": batch, "labels": batch["input_ids"]}
    preamble["base_model"] = base_model

    block = fence("test_peft_example")
    ns = run_fence(part(block, None, "save_mlx_lm_adapters("), preamble)

    # the loop trained: the last step's loss (after 19 updates) well under the untrained one
    base_loss = _loss(base_logits, tokens)
    assert float(ns["loss"].detach()) < base_loss - 1.0, (float(ns["loss"]), base_loss)
    trained_logits = _torch_logits(ns["model"], tokens)

    run_fence(part(block, "save_mlx_lm_adapters(", "fused = fuse("), ns)
    # ./adapters is mlx-lm's format: mlx-lm with it gives the trained model's logits
    assert {p.name for p in (tmp_path / "adapters").iterdir()} >= {
        "adapters.safetensors",
        "adapter_config.json",
    }
    gen_args = importlib.import_module("mlx_lm.generate").setup_arg_parser()
    gen_args.parse_args(["--model", str(ckpt), "--adapter-path", "adapters"])  # the comment's
    exported = _mlx_logits(load(str(ckpt), adapter_path="adapters")[0], tokens)
    assert np.abs(exported - trained_logits).max() < 1e-4
    # mlx-lm's adapters loaded the other way give mlx-lm's logits
    theirs = _mlx_logits(load(str(ckpt), adapter_path="adapters_from_mlx_lm")[0], tokens)
    assert np.abs(theirs - base_logits).max() > 0.05  # the adapters matter
    assert np.abs(_torch_logits(ns["model"], tokens) - theirs).max() < 1e-4

    run_fence(part(block, "fused = fuse(", None), ns)
    # fused: re-quantized AffineLinear layers, no LoRA left; ./fused loads in mlx-lm alike
    fused = ns["fused"]
    assert not [n for n, _ in fused.named_modules() if "lora" in n]
    assert isinstance(fused.model.layers[0].self_attn.q_proj, AffineLinear)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert list((tmp_path / "fused").glob("*.safetensors"))
    fused_theirs = _mlx_logits(load_model(tmp_path / "fused")[0], tokens)
    assert np.abs(fused_theirs - base_logits).max() > 0.05
    assert np.abs(_torch_logits(fused, tokens) - fused_theirs).max() < 1e-4


# --- Command line, Reporting a Metal problem ---------------------------------------------------

# The README's example output of `mlxq demo`, line by line; each pattern must match the README's
# line and the real one (numbers, the cache path, dtype and threads of this machine differ).
DEMO_LINES = [
    r"SmolLM2-135M-Instruct, MLX 4-bit group 32, through transformers \+ mlxq on cpu "
    r"\(\S*/models/smollm2-135m-4bit-g32-mlxq-[0-9a-f]{8}\)",
    r"> What is the capital of France\?",
    r".*\bParis\b.*",
    r"-- load [\d.]+ s \| prefill \d+ tokens at [\d.]+ tok/s \| decode \d+ tokens at [\d.]+ "
    r"tok/s \| peak memory \d+ MB \| cpu (bfloat16|float32), \d+ threads?",
]


def test_demo_and_doctor_examples() -> None:
    import os

    from cli_batch import run_cli_batch

    console = fence("test_demo_and_doctor_examples", lang="console").text.splitlines()
    assert console[0] == "$ mlxq demo"
    example = console[1:]
    assert len(example) == len(DEMO_LINES), example
    for pattern, line in zip(DEMO_LINES, example, strict=True):
        assert re.fullmatch(pattern, line), f"README's example line {line!r} !~ {pattern!r}"
    doctor = fence("test_demo_and_doctor_examples", lang="sh").text.split("#")[0].split()
    assert doctor == ["mlxq", "doctor"]

    env = dict(os.environ, HF_HUB_OFFLINE="1", MLXQ_CACHE=str(TEST_CACHE))
    env.pop("MLXQ_DEBUG", None)
    runs = run_cli_batch({"demo": shlex.split(console[0][2:])[1:], "doctor": doctor[1:]}, env)
    demo = runs["demo"]
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = demo.stdout.strip().splitlines()
    assert len(lines) >= len(DEMO_LINES), demo.stdout
    out = [lines[0], lines[1], " ".join(lines[2:-1]), lines[-1]]  # the answer may wrap
    on_cpu = " on cpu " in out[0]  # the README's output is the CPU's; elsewhere, less to hold
    for i, (pattern, line) in enumerate(zip(DEMO_LINES, out, strict=True)):
        if on_cpu or i in (1, 2):
            assert re.fullmatch(pattern, line), f"mlxq demo printed {line!r} !~ {pattern!r}"

    report = runs["doctor"]
    assert report.returncode == 0, report.stderr[-3000:]
    fields = dict(
        line.split(None, 1) for line in report.stdout.splitlines()[2:] if len(line.split()) > 1
    )
    # what the README says the report holds (Reporting a Metal problem; the command-line table)
    for key in ("mlxq_version", "torch_version", "macos_version", "mps_available"):
        assert key in fields, key
    for key in ("metal_path", "metal_reason", "metal_attempts", "metallib", "metal_sources"):
        assert key in fields, key
    for key in ("cpu_isa", "cpu_threaded", "cache"):
        assert key in fields, key
    assert fields["cache"] == str(TEST_CACHE)


def test_macos_install_is_not_run() -> None:
    """`pip install torch` and the build would change this environment: not run. What it
    relies on: the build runs without isolation, as the quick start's does."""
    lines = fence("test_macos_install_is_not_run").text.splitlines()
    assert [line.split("#")[0].strip() for line in lines] == [
        "pip install torch",
        "pip install --no-build-isolation .",
    ]


# --- Layout, Benchmarks -----------------------------------------------------------------------


def test_layout_names_existing_files() -> None:
    """Every folder at the start of a Layout line exists, and every file it names exists
    somewhere under that folder."""
    files = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if ".git" not in p.parts}
    top = None
    for line in fence("test_layout_names_existing_files").text.splitlines():
        if m := re.match(r"(\S+/)\s", line):
            top = m.group(1)
            assert (REPO / top).is_dir(), top
        for name in re.findall(r"\b[\w/]+\.(?:py|cpp|mm|metal|cu|cuh|h|txt)\b", line):
            assert name in files or any(
                f.startswith(top) and (f.endswith("/" + name) or f == top + name) for f in files
            ), f"Layout names {name} under {top}: no such file"


def test_benchmarks_example(tmp_path, monkeypatch) -> None:
    """`python benchmarks/bench_ops.py` as the block runs it, on one cell of its table (its
    flags), and the README's claim on where it writes: JSON under $MLXQ_CACHE/bench/."""
    command = fence("test_benchmarks_example").text.split("#")[0].split()
    assert command[:2] == ["python", "benchmarks/bench_ops.py"] and len(command) == 2
    cell = ["--m", "1", "--bits", "4", "--shapes", "4096x4096", "--peers", "dense"]
    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [command[1], *cell, "--budget", "0.02"])
    out = []
    with contextlib.redirect_stdout(_Tee(out)):
        runpy.run_path(str(REPO / command[1]), run_name="__main__")
    written = json.loads((tmp_path / "bench" / "ops.json").read_text())
    (row,) = written["rows"]
    assert row["M"] == 1 and row["bits"] == 4 and row["mlxq_fp32"] > 0 and "dense_fp32" in row
    assert any("mlxq" in line for line in out)  # the table


class _Tee:
    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def write(self, s: str) -> int:
        self.sink.extend(s.splitlines())
        return len(s)

    def flush(self) -> None:
        pass


# --- The command-line table and inline command lines ------------------------------------------


def _parser(words: list[str]) -> argparse.ArgumentParser:
    """The parser of `mlxq WORDS...` (`bench ops` / `bench model`: the benchmark's own)."""
    from mlxq.cli import build_parser

    if words[0] == "bench":
        return importlib.import_module(f"mlxq.bench.{words[1]}").build_parser()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[words[0]]


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def _command_table() -> list[tuple[list[str], str]]:
    """(command words, the row's text) of each row of the "Command line" table."""
    section = README.read_text().split("\n## Command line\n")[1].split("\n## ")[0]
    rows = []
    for line in section.splitlines():
        if m := re.match(r"\| `mlxq ([a-z ]+?)(?: [A-Z\[-].*?)?` \|", line):
            rows.append((m.group(1).split(), line))
    return rows


def test_cli_table_names_existing_flags() -> None:
    """Every --flag of a row of the table is an option of that command; the rows of the
    commands the table describes in full (not `bench`) name every option."""
    rows = _command_table()
    assert [" ".join(w) for w, _ in rows] == [
        "demo",
        "generate",
        "inspect",
        "convert",
        "bench ops",
        "bench model",
        "doctor",
    ]
    for command, row in rows:
        options = _options(_parser(command))
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", row))
        assert not named - set(options), f"mlxq {' '.join(command)}: {named - set(options)}"
        if command[0] != "bench":
            documented = {
                s
                for s, a in options.items()
                if s.startswith("--") and s != "--help" and a.help != argparse.SUPPRESS
            }
            missing = documented - named
            assert not missing, f"the README's row of mlxq {' '.join(command)} omits {missing}"


INLINE = re.compile(
    r"`(mlxq|bench_ops|bench_model|python benchmarks/bench_(?:ops|model)\.py)((?:\s[^`]*)?)`"
)


def test_inline_command_lines_parse() -> None:
    """Each `mlxq ...` (or bench_ops/bench_model) command line in the README's prose: every
    --flag exists, and values given to an option with choices are among them."""
    checked = 0
    for m in INLINE.finditer(README.read_text()):
        program, rest = m.group(1), m.group(2).split()
        if "bench_ops" in program or "bench_model" in program:
            words = ["bench", "ops" if "ops" in program else "model"]
        elif rest and rest[0] in ("demo", "generate", "inspect", "convert", "doctor"):
            words = rest[:1]
        elif rest[:2] in (["bench", "ops"], ["bench", "model"]):
            words = rest[:2]
        else:  # `mlxq demo | generate | ...`, `mlxq / dense`, `python -m mlxq` aside
            continue
        rest = rest[len(words) :] if program == "mlxq" else rest
        options = _options(_parser(words))
        action = None
        for token in (t.strip("[]") for t in rest):
            if token.startswith("--"):
                assert token in options, f"README's `{m.group(0)}`: no option {token}"
                action = options[token]
            elif action is not None and action.choices and not re.fullmatch(r"[A-Z_.]+", token):
                value = action.type(token) if action.type else token
                assert value in action.choices, f"README's `{m.group(0)}`: {token} for {action}"
        checked += 1
    assert checked >= 10, checked


# --- "take MLX's arguments in MLX's order" (Every MLX quantization mode) -----------------------


def _mlx_parameters(doc: str) -> tuple[int, list[tuple[str, str | None, bool]]]:
    """From an MLX function's signature line (its __doc__'s first line): how many leading
    parameters are positional-only (before `/`), and (name, default, keyword-only) of the
    others, in order (`stream` left out)."""
    inside = doc.splitlines()[0].split("(", 1)[1].rsplit(")", 1)[0]
    params = [p.strip() for p in inside.split(",")]
    lead = params.index("/") if "/" in params else 0
    out, keyword_only = [], False
    for p in params[lead + 1 if "/" in params else 0 :]:
        if p == "*":
            keyword_only = True
            continue
        name, _, default = p.partition("=")
        if (name := name.split(":")[0].strip()) != "stream":
            out.append((name, default.strip() or None, keyword_only))
    return lead, out


@pytest.mark.parametrize("name", ["quantize", "dequantize", "quantized_matmul"])
def test_mode_functions_take_mlx_arguments_in_mlx_order(name: str) -> None:
    """README: `mlxq.quantize` / `dequantize` / `quantized_matmul` take MLX's arguments in MLX's
    order (`group_size=None, bits=None, mode="affine"`, keyword `global_scale`, `dtype`), with
    MLX's defaults."""
    import inspect

    import mlx.core as mx
    import mlxq

    lead, theirs = _mlx_parameters(getattr(mx, name).__doc__)
    ours = list(inspect.signature(getattr(mlxq, name)).parameters.values())
    positional = [p for p in ours if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = {p.name: p for p in ours if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(keyword) <= {"global_scale", "dtype"}, (name, set(keyword))
    # MLX's positional-only arrays (w; x, w) come first in ours too, whatever their names; the
    # rest in MLX's order, but for global_scale and dtype, which ours takes by keyword only
    expected = [(n, d) for n, d, kw in theirs if not kw and n not in keyword]
    assert [p.name for p in positional[lead:]] == [n for n, _ in expected], name
    for p, (_, their_default) in zip(positional[lead:], expected, strict=True):
        if their_default is not None:
            assert repr(p.default).replace('"', "'") == their_default, (name, p.name)
    defaults = {n: d for n, d, _ in theirs}
    if name == "quantized_matmul":  # MLX 0.32 takes nvfp4's global scale in gather_qmm only
        defaults.setdefault("global_scale", "None")
    for n, p in keyword.items():
        assert repr(p.default) == defaults[n], (name, n)

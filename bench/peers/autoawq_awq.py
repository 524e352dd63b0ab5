"""Peer run: AutoAWQ (scales + its default clipping search, then its own min-max RTN) on lowbit's
calibration tokens.

Runs inside AutoAWQ's own virtual environment (autoawq 0.2.9 needs transformers 4.x; setup in
bench/README.md):

    VENV/bin/python bench/peers/autoawq_awq.py MODEL_DIR TOKENS.safetensors BITS GROUP OUT_DIR

Asymmetric ``BITS``-bit weights (AutoAWQ's ``zero_point``) in groups of ``GROUP``. The model is
searched with ``export_compatible=True`` (scales folded and weights clipped, nothing packed), then
every decoder linear is replaced by AutoAWQ's own ``pseudo_quantize_tensor`` of it, and the result
is written in float32 as a plain Hugging Face folder (see ``llmc_gptq.py``) for lowbit's harness.
Our model folders are written by transformers 5, whose config keeps ``rope_theta`` under
``rope_parameters``: a transformers-4 copy of the config is made for loading.

AutoAWQ's scale search is fixed for the CPU here: it snapshots the weights with
``{k: v.cpu() for k, v in module.state_dict().items()}``, which copies them off a GPU but returns
the very same tensors on a CPU, so its first candidate's in-place ``W *= s`` leaks into the
snapshot and every later candidate, and the chosen scales, land on ``W * s_0`` (the float model's
output then changes: on SmolLM2 the first q_proj's output moved by 58%). During that search
``Tensor.cpu`` copies tensors already on the CPU, as it does for GPU tensors.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from llmc_gptq import save_fake_quant  # noqa: E402


def v4_folder(model_dir: Path, tmp: Path) -> Path:
    """``model_dir``'s weights beside a config transformers 4 reads the same way."""
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            (tmp / f.name).symlink_to(f.resolve())
    return tmp


def fix_cpu_snapshot() -> None:
    """Make AutoAWQ's scale search restore the true weights on a CPU (module docstring)."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale
    real_cpu = torch.Tensor.cpu

    def cpu_copy(t: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        return t.clone() if t.device.type == "cpu" else real_cpu(t, *a, **k)  # type: ignore[arg-type]

    def fixed(self: object, *args: object, **kwargs: object) -> torch.Tensor:
        torch.Tensor.cpu = cpu_copy  # type: ignore[method-assign]
        try:
            return search(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            torch.Tensor.cpu = real_cpu  # type: ignore[method-assign]

    AwqQuantizer._compute_best_scale = fixed  # type: ignore[method-assign]


def main() -> None:
    model_dir, tokens_file, bits, group, out = (Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                Path(sys.argv[5]))
    from awq import AutoAWQForCausalLM

    if not torch.cuda.is_available():
        fix_cpu_snapshot()
    tokens = load_file(tokens_file)["tokens"]
    with tempfile.TemporaryDirectory() as td:
        model = AutoAWQForCausalLM.from_pretrained(str(v4_folder(model_dir, Path(td))), torch_dtype=torch.float32,
                                                   device_map=None, safetensors=True)
        t0 = time.perf_counter()
        model.quantize(None, quant_config={"zero_point": True, "q_group_size": group, "w_bit": bits,
                                           "version": "GEMM"},
                       calib_data=tokens.tolist(), max_calib_samples=tokens.shape[0],
                       max_calib_seq_len=tokens.shape[1], export_compatible=True)
        n = 0
        with torch.no_grad():
            for layer in model.model.model.layers:
                for m in layer.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.data = model.quantizer.pseudo_quantize_tensor(m.weight.data)[0]
                        n += 1
        seconds = time.perf_counter() - t0
    if n == 0:
        raise SystemExit("AutoAWQ left no decoder linear: nothing to compare")
    save_fake_quant(model.model, str(model_dir), out, {"tool": "autoawq", "seconds": seconds, "bits": bits,
                                                        "group_size": group, "linears": n})
    print(json.dumps({"seconds": seconds, "linears": n}))


if __name__ == "__main__":
    main()

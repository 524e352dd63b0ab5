"""Peer run: GPTQModel's GPTQ on the same model and calibration tokens as lowbit.

Runs in the global environment (GPTQModel 7.7.0, CPU only):

    python bench/peers/gptqmodel_gptq.py MODEL_DIR TOKENS.safetensors BITS GROUP OUT_DIR

Writes OUT_DIR as a plain Hugging Face folder holding GPTQModel's dequantized (fake-quantized)
weights in float32, like ``llmc_gptq.py``, so the caller evaluates them in its own harness.

Choices:

* ``GPTQConfig(bits, group_size, sym=True, desc_act=True, static_groups=True, act_group_aware=False,
  damp_percent=0.01)``: act-order with static groups (scales/zeros of each contiguous column group
  are fixed from the original weight before the act-order sweep, ``g_idx`` = column // group), i.e.
  llm-compressor's default static actorder. ``act_group_aware`` (GPTQModel's default group-aware
  reordering, incompatible with ``desc_act``) is off. Everything else is GPTQModel's default
  (``damp_auto_increment`` only kicks in if the Cholesky fails, ``mse=0`` = plain min/max scales).
* The float model is loaded in float32 (GPTQModel's CPU default would be bf16), as llmc_gptq.py does.
* Calibration: the token rows exactly as given, batch_size=1, ``calibration_sort=None`` (native
  order; GPTQModel's default sorts by length), no concatenation, no tokenizer involved.
* GPTQModel swaps each quantized Linear for a packed module, so the float weights are not left in
  the model: its checkpoint is saved to a temporary folder and qweight/qzeros/scales/g_idx are
  dequantized here (``checkpoint_format`` gptq = v1, zeros stored minus one; gptq_v2 without).
* The dequantized weights match GPTQModel's in-memory GPTQ result up to the fp16 rounding of the
  saved scales (checked on SmolLM2-135M: relative max difference ~3e-4).
* ``GPTQMODEL_CPU_WORKERS=2`` unless already set; GPTQModel's per-run ``logs/`` go to the temp folder
  and its console output (printed to stdout) to stderr, so stdout is just the final JSON line.
  ``seconds`` times ``quantize()`` only (it includes GPTQModel's packing and disk offload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from llmc_gptq import save_fake_quant
from safetensors.torch import load_file

log = logging.getLogger("gptqmodel_gptq")


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words along ``dim``: the words form one little-endian bit stream holding
    ``bits``-bit values back to back (the GPTQ v1 layout; for 3 bits a value may straddle two
    words, as AutoGPTQ packs 32 values into 3 words)."""
    assert packed.dtype == torch.int32, packed.dtype
    x = packed.movedim(dim, -1)
    stream = torch.bitwise_and(torch.bitwise_right_shift(x.unsqueeze(-1), torch.arange(32, dtype=torch.int32)), 1)
    stream = stream.flatten(-2)  # (..., words * 32) bits, low bits first
    n = stream.shape[-1] // bits
    vals = (stream[..., : n * bits].reshape(*stream.shape[:-1], n, bits)
            << torch.arange(bits, dtype=torch.int32)).sum(-1)
    return vals.movedim(-1, dim)


def dequantize_checkpoint(qdir: Path, bits: int) -> dict[str, torch.Tensor]:
    """Dequantized float32 ``<module>.weight`` (out, in) for every GPTQ-packed module in ``qdir``."""
    qcfg = json.loads((qdir / "quantize_config.json").read_text())
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    assert fmt in ("gptq", "gptq_v2"), f"unsupported checkpoint format {fmt!r}"
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        q = unpack(sd[key], bits, 0)  # (in, out)
        zeros = unpack(sd[prefix + ".qzeros"], bits, 1)[:, : q.shape[1]]  # (groups, out)
        if fmt == "gptq":
            zeros = zeros + 1
        g_idx = sd[prefix + ".g_idx"].long()
        scales = sd[prefix + ".scales"].to(torch.float32)
        w = (q - zeros[g_idx]).to(torch.float32) * scales[g_idx]
        out[prefix + ".weight"] = w.t().contiguous()
    return out


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to stderr (GPTQModel's banner and progress bars print to stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(model_dir: str, tokens_file: str, bits: int, group: int, out: Path) -> float:
    """Quantize with GPTQModel, write OUT_DIR; return the seconds ``quantize()`` took."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel
    from gptqmodel.looper import loop_processor
    from gptqmodel.quantization.config import GPTQConfig
    from transformers import AutoModelForCausalLM

    tokens = load_file(tokens_file)["tokens"]
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in tokens]
    qcfg = GPTQConfig(bits=bits, group_size=group, sym=True, desc_act=True, static_groups=True,
                      act_group_aware=False, damp_percent=0.01)
    with tempfile.TemporaryDirectory(prefix="gptqmodel_q_") as tmp:
        loop_processor._PROJECT_LOG_DIR = Path(tmp, "logs")  # it would write ./logs/ otherwise
        model = GPTQModel.load(model_dir, qcfg, dtype=torch.float32, device="cpu")
        t0 = time.perf_counter()
        model.quantize(calib, batch_size=1, calibration_sort=None)
        seconds = time.perf_counter() - t0
        model.save(str(Path(tmp, "q")))
        del model
        deq = dequantize_checkpoint(Path(tmp, "q"), bits)

    fmodel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(fmodel.named_parameters())
    assert deq and set(deq) <= set(params), sorted(set(deq) - set(params))[:5]
    worst = 0.0
    with torch.no_grad():
        for name, w in deq.items():
            assert params[name].shape == w.shape, (name, params[name].shape, w.shape)
            worst = max(worst, (params[name] - w).abs().max().item())
            params[name].copy_(w)
    log.info("dequantized %d modules, max |w - w_float| = %.4g", len(deq), worst)
    save_fake_quant(fmodel, model_dir, out, {"tool": "gptqmodel", "seconds": seconds, "bits": bits,
                                             "group_size": group})
    return seconds


def main() -> None:
    model_dir, tokens_file, bits, group, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(
        sys.argv[5])
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with stdout_to_stderr():
        seconds = run(model_dir, tokens_file, bits, group, out)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()

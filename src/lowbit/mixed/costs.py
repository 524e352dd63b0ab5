"""The predicted cost of storing one tensor one way: the weight error a candidate makes, weighted by Fisher.

With ``r (out,)`` and ``Hw`` from :mod:`lowbit.mixed.fisher`, the predicted mean KL divergence of
quantizing ``W (out, in)`` to ``W + dW`` alone is

    cost(dW) = 1/2 sum_o r_o dw_o^T Hw dw_o                    (full Hw, (in, in))
             = 1/2 sum_o r_o sum_j Hw_jj dw_oj^2               (diagonal: Hw given as (in,))

For an embedding (GGUF's ``token_embd``; with tied embeddings also the output head, whose cost adds) the
input path is ``1/2 s^2 sum_v sum_d A_vd dw_vd^2`` over the rows seen in calibration (``s``: the embedding's
output scale).

``dW`` comes from the candidate's own quantizer, exactly as the artifact will hold it: llama.cpp's block
encoders with the same importance matrix (``lowbit.formats.gguf.encode.quantize_rows``, dequantized by the
``gguf`` package), or lowbit's RTN / importance-weighted RTN / GPTQ for integer schemes (scales rounded to
the artifact's storage dtype).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lowbit.core.scheme import QuantScheme
from lowbit.formats.gguf.encode import quantize_rows
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.methods.rtn import fake_quantize, quantize_rtn
from lowbit.mixed.candidates import Candidate

Q = gguf.GGMLQuantizationType
_NO_IMATRIX = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)  # types the writer quantizes without one (as llama.cpp)
INT_METHODS = ("rtn", "imatrix", "gptq")


def fisher_error(dW: torch.Tensor, F: torch.Tensor, rows: int = 8192) -> float:
    """``1/2 sum_oj F_oj dW_oj^2`` (float64 sums, ``rows`` rows at a time)."""
    total = 0.0
    for r0 in range(0, dW.shape[0], rows):
        total += float((dW[r0:r0 + rows].float().square() * F[r0:r0 + rows]).sum(dtype=torch.float64))
    return 0.5 * total


def output_error(dW: torch.Tensor, H: torch.Tensor, rows: int = 4096) -> float:
    """``sum_o dw_o^T H dw_o`` for ``H (in, in)`` or its diagonal ``(in,)`` (float64 sums)."""
    total = 0.0
    for r0 in range(0, dW.shape[0], rows):
        d = dW[r0:r0 + rows].float()
        total += float(((d.square() * H) if H.ndim == 1 else (d @ H) * d).sum(dtype=torch.float64))
    return total


def gguf_delta(W: torch.Tensor, t: Q, imatrix: np.ndarray | None) -> torch.Tensor:
    """``dW`` of storing ``W (rows, cols)`` as GGUF type ``t`` (llama.cpp's bytes, then dequantized)."""
    x = W.detach().to(torch.float32).cpu().numpy()
    im = None if t in _NO_IMATRIX else imatrix
    if t == Q.F16:
        back = x.astype(np.float16).astype(np.float32)
    else:
        back = gguf.quants.dequantize(quantize_rows(x, t, im), t).reshape(x.shape)
    return torch.from_numpy(back - x)


def int_delta(W: torch.Tensor, scheme: QuantScheme, method: str, *, act2: torch.Tensor | None = None,
              H: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.bfloat16,
              gptq: GPTQConfig | None = None) -> torch.Tensor:
    """``dW`` of quantizing ``W (out, in)`` to ``scheme`` by ``method`` (``rtn``, ``imatrix`` with ``act2``,
    ``gptq`` with the full ``H``), on the layer alone (float inputs)."""
    Wf = W.detach().to(torch.float32)
    if method == "rtn":
        return fake_quantize(Wf, scheme, scale_dtype) - Wf
    if method == "imatrix":
        if act2 is None:
            raise ValueError("importance-weighted RTN needs act2 (E[x^2])")
        return quantize_rtn(Wf, scheme, importance=act2, scale_dtype=scale_dtype).dequantize() - Wf
    if method == "gptq":
        if H is None:
            raise ValueError("GPTQ needs the full Hessian")
        qw, _ = gptq_quantize(Wf, H, scheme, gptq or GPTQConfig(), scale_dtype=scale_dtype)
        return qw.dequantize() - Wf
    raise ValueError(f"unknown method {method!r}; use one of {INT_METHODS}")


def delta(W: torch.Tensor, c: Candidate, method: str = "rtn", *, act2: torch.Tensor | None = None,
          H: torch.Tensor | None = None, imatrix: np.ndarray | None = None,
          scale_dtype: torch.dtype = torch.bfloat16, gptq: GPTQConfig | None = None) -> torch.Tensor:
    """``dW`` of candidate ``c`` on ``W`` (see :func:`gguf_delta`, :func:`int_delta`)."""
    if c.gguf is not None:
        return gguf_delta(W, c.gguf, imatrix)
    assert c.scheme is not None
    return int_delta(W, c.scheme, method, act2=act2, H=H, scale_dtype=scale_dtype, gptq=gptq)

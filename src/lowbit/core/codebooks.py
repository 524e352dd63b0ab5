"""Code books of the data-type formats, in the index order bitsandbytes stores them.

NF4 (QLoRA, Dettmers et al. 2023, appendix E): the 16 quantiles of N(0, 1) normalised to
[-1, 1], with an exact zero; sorted, so index order is value order.

FP4 (bitsandbytes' E2M1 variant, exponent bias 2): index ``s eee`` -> value; listed in bit-pattern
order (not value order), normalised by the largest magnitude (12)::

    0b000 0   0b001 0.0625   0b010 8   0b011 12   0b100 4   0b101 6   0b110 2   0b111 3

The 8-bit dynamic map (Dettmers 2016, "8-bit approximations"): sign, a run of zero bits that
sets the decimal exponent 10^-(6-i), then a linear fraction; used for the absmax values of
double quantization. Values are float32, as bitsandbytes builds them.
"""

from __future__ import annotations

import torch

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code4(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values ``(16,)`` float32 of ``nf4`` or ``fp4`` in storage index order."""
    if kind == "nf4":
        t = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    elif kind == "fp4":
        t = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
    else:
        raise ValueError(f"no 4-bit code book named {kind!r}; use 'nf4' or 'fp4'")
    return t / t.abs().max()


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map ``(256,)`` float32, sorted ascending.

    For exponent level ``i = 0..6`` there are ``2^i + 1`` boundaries linearly spaced in [0.1, 1]
    (float32); the ``2^i`` midpoints times ``10^(i-6)`` are codes, with both signs; then 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)

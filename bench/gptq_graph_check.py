"""On a GPU: the CUDA-graph replay of GPTQ's column loop equals the eager loop, and a full
``gptq_quantize`` with graphs equals one without (same codes), on random data.

    PYTHONPATH=src python bench/gptq_graph_check.py
"""

from __future__ import annotations

import torch

from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.methods.gptq_block import block_columns, run_block_columns


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for rows, cols in ((4096, 128), (6144, 128), (512, 64)):
        W1 = torch.randn(rows, cols, device=dev, generator=g) * 0.02
        A = torch.randn(cols, cols, device=dev, generator=g)
        U1 = torch.linalg.cholesky(A @ A.T / cols + torch.eye(cols, device=dev), upper=True)
        scale = torch.full((rows, cols), 0.004, device=dev)
        zero = torch.full((rows, cols), 8.0, device=dev)
        outs = []
        for graphs in (False, True, True):  # the second graphed call replays the cached graph
            W, Q, E = W1.clone(), torch.empty_like(W1), torch.empty_like(W1)
            (run_block_columns if graphs else block_columns)(W, U1, scale, zero, 15, Q, E)  # type: ignore[operator]
            outs.append((W, Q, E))
        for o in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(outs[0], o, strict=True)), (rows, cols)
    w = torch.randn(1024, 512, device=dev, generator=g) * 0.02
    x = torch.randn(4096, 512, device=dev, generator=g)
    H = 2 * x.T @ x / x.shape[0]
    a, _ = gptq_quantize(w, H, QuantScheme(4, 128), GPTQConfig(cuda_graphs=False))
    b, _ = gptq_quantize(w, H, QuantScheme(4, 128), GPTQConfig(cuda_graphs=True))
    same = float((a.codes == b.codes).float().mean())
    print(f"graph check: column loop identical; gptq_quantize codes identical on {same:.6f} of weights")
    assert same > 0.9999


if __name__ == "__main__":
    main()

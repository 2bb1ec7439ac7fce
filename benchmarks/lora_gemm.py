"""GPU time of one LoRA projection's matmuls, two ways, at a training step's shapes (bf16, CUDA).

    python benchmarks/lora_gemm.py [--tokens 8192] [--r 16]

For each projection of Mistral-7B (in, out features) it times, by CUDA events, median of 20:

- ``separate``: what the lean forward runs today. Forward ``addmm(x @ W^T, x @ A^T, B^T)``
  (``addmm`` out of place, as in a compiled graph); backward ``g @ W`` for x, ``g @ B`` for h,
  ``h^T @ g`` for B, and the adapter's ``dh @ A`` added to x's gradient.
- ``concat``: the adapter's update on the base matmul's inner dimension: forward
  ``[x | s h] @ [W | B]^T``; backward ``g @ [W | B]`` (x's and h's gradients in one matmul),
  ``h^T @ g`` for B, and the same ``dh @ A``. The concatenations are timed too; the weight's
  dequantization is left out of both (the same work either way).

Both at r and with r padded to a multiple of 64 (``concat64``), where the inner dimension keeps
the alignment cuBLAS's fastest kernels want.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

MISTRAL = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}


def timed(fn, repeat: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def projection(tokens: int, fin: int, fout: int, r: int, pad: int) -> dict[str, float]:
    dev, bf = "cuda", torch.bfloat16
    x, g = (
        torch.randn(tokens, fin, device=dev, dtype=bf),
        torch.randn(tokens, fout, device=dev, dtype=bf),
    )
    w = torch.randn(fout, fin, device=dev, dtype=bf) / fin**0.5
    a, b = torch.randn(r, fin, device=dev, dtype=bf), torch.randn(fout, r, device=dev, dtype=bf)
    h = x @ a.t()

    def separate_fwd():
        return torch.addmm(x @ w.t(), h, b.t(), alpha=2.0)

    def separate_bwd():
        dh = g @ b
        return torch.addmm(g @ w, dh, a), h.t() @ g

    rp = -(-r // pad) * pad
    bp = torch.nn.functional.pad(b, (0, rp - r))
    hp = torch.nn.functional.pad(h, (0, rp - r))

    def concat_fwd():
        return torch.cat([x, hp], 1) @ torch.cat([w, bp], 1).t()

    def concat_bwd():
        gxh = g @ torch.cat([w, bp], 1)
        return gxh[:, :fin].addmm(gxh[:, fin : fin + r].contiguous(), a), hp.t() @ g

    return {
        "separate_fwd": timed(separate_fwd),
        "separate_bwd": timed(separate_bwd),
        "concat_fwd": timed(concat_fwd),
        "concat_bwd": timed(concat_bwd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    rows = {}
    for name, (fin, fout) in MISTRAL.items():
        for pad in (1, 64):
            rows[f"{name} pad{pad}"] = {
                k: round(v, 4) for k, v in projection(args.tokens, fin, fout, args.r, pad).items()
            }
            print(name, f"pad{pad}", rows[f"{name} pad{pad}"], flush=True)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "tokens": args.tokens,
                "r": args.r,
                "ms": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

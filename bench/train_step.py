"""Time one training step (forward + backward) of an XMoE layer against the dense SwiGLU FFN it
replaces, in one process: the grouped ``moe_ffn`` op's autograd against the dense masked path
that ``XMoE`` takes when training on a batch keeping at least ``XMoE.DENSE_TRAIN_SHARE`` of its
experts (SmolLM2 widths d=576, d_ff=1536, float32, 512 tokens, ``torch.set_num_threads(2)``).

    python bench/train_step.py --out bench/results-layers.md   # appends a dated section
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moefx.config import XMoEConfig  # noqa: E402
from moefx.layers import XMoE  # noqa: E402

D, DFF = 576, 1536


class DenseSwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, DFF, bias=False), nn.Linear(D, DFF, bias=False), nn.Linear(DFF, D, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def step_ms(module, x, min_time: float) -> float:
    def step():
        module(x).pow(2).mean().backward()

    for _ in range(2):
        step()
    times = []
    end = time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--share", type=float, nargs="+", default=[0.75, 0.5],
                        help="share of the routed experts each token keeps (top-k = share x E)")
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append the Markdown record to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, D, requires_grad=True)
    dense_ms = step_ms(DenseSwiGLU().train(), x, args.min_time)
    rows = [f"| dense SwiGLU FFN | 100% | {dense_ms:.1f} | | 1.00x |"]
    print(rows[0], flush=True)
    for experts, shared in ((64, 16), (256, 64)):
        for share in args.share:
            k = max(1, round(share * experts))
            layer = XMoE(XMoEConfig(num_experts=experts, threshold=None, top_k=k, num_shared=shared), D, DFF,
                         activation="silu", glu=True, bias=False, converted=True).train()
            times = {}
            for path, limit in (("op", 2.0), ("dense masked", 0.0)):
                XMoE.DENSE_TRAIN_SHARE = limit
                times[path] = step_ms(layer, x, args.min_time)
            XMoE.DENSE_TRAIN_SHARE = 0.5
            row = (f"| XMoE {experts} + {shared} shared, top-{k} | {share:.0%} of routed | {times['op']:.1f} | "
                   f"{times['dense masked']:.1f} | {dense_ms / times['op']:.2f}x / {dense_ms / times['dense masked']:.2f}x |")
            rows.append(row)
            print(row, flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    text = "\n".join([
        f"\n## Training step (forward + backward), bench/train_step.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{args.tokens} tokens, float32; load average {load}. Median ms per step; the last column is dense "
        "time / layer time for the grouped op and for the dense masked path.",
        "",
        "| layer | kept | op ms | dense masked ms | vs dense (op / masked) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a tiny byte-level language model whose FFNs are SliceMoE layers, on the docstrings of
the Python standard library, and watch it learn and balance its experts.

    python examples/train_slicemoe.py              # ~300 steps, well under 2 minutes on a CPU
    python examples/train_slicemoe.py --steps 5    # smoke run

Every ``--log-every`` steps it prints the training loss, the expert load entropy (ELE, 1.0 =
perfectly balanced experts, SPEC.md §2) and the slice-level capacity loss; at the end it
evaluates held-out text and says whether ELE ended above 0.9. The text is whatever docstrings
this Python installation has for a fixed list of modules, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import sys
import time

# A shared CPU: with OpenMP's default spin-waiting, a descheduled worker thread stalls every small
# parallel region by a scheduler time slice. Passive waiting must be chosen before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import moefx  # noqa: E402
from moefx import metrics  # noqa: E402
from moefx.config import SliceMoEConfig  # noqa: E402
from moefx.layers import SliceMoE  # noqa: E402

MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fractions", "functools", "heapq", "inspect", "itertools", "json",
    "logging", "pathlib", "pprint", "queue", "random", "re", "shutil", "statistics", "string",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def stdlib_docstrings(modules=MODULES) -> str:
    """The docstrings of a fixed list of stdlib modules and their public members, in a fixed
    order (sorted names), so that a seed reproduces a run on one Python version."""
    parts = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, moe_config: SliceMoEConfig) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = SliceMoE(moe_config, d_model=d, d_ff=4 * d, activation="gelu")

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level decoder: embeddings, ``layers`` pre-norm blocks with SliceMoE FFNs, tied head."""

    def __init__(self, d=64, layers=2, heads=4, context=64, moe_config=None) -> None:
        super().__init__()
        moe_config = moe_config or SliceMoEConfig(num_slices=4, num_experts=8, top_k=2, router_hidden=32, slice_dropout=0.1)
        self.embed = nn.Embedding(256, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads, moe_config) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.embed.weight.t()


def batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model, data, context, generator, batches_n=4, batch=16):
    model.eval()
    losses = []
    it = batches(data, batch, context, generator)
    with metrics.collect(model) as stats:
        for _ in range(batches_n):
            x, y = next(it)
            losses.append(F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses), stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("MOEFX_EXAMPLE_STEPS", 300)))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = stdlib_docstrings()
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    print(f"text: {len(text):,} characters of stdlib docstrings ({train.numel():,} train / {val.numel():,} held-out bytes)")
    model = TinyLM(context=args.context)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, {len(model.blocks)} blocks with {model.blocks[0].ffn}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    it = batches(train, args.batch, args.context, gen)
    start = time.perf_counter()
    history = []
    for step in range(1, args.steps + 1):
        x, y = next(it)
        log = step == 1 or step % args.log_every == 0 or step == args.steps
        if log:
            with metrics.collect(model) as stats:
                logits = model(x)
        else:
            logits = model(x)
        lm_loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        cap_loss = moefx.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        (lm_loss + cap_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log:
            history.append((step, lm_loss.item(), stats.mean("ele"), cap_loss.item()))
            print(f"step {step:4d}  loss {lm_loss.item():.3f}  ELE {stats.mean('ele'):.3f}  "
                  f"capacity loss {cap_loss.item():.4f}  ({time.perf_counter() - start:.1f}s)", flush=True)
    val_loss, stats = evaluate(model, val, args.context, torch.Generator().manual_seed(args.seed + 1))
    ele = stats.mean("ele")
    print(f"held-out: loss {val_loss:.3f} (uniform guess {math.log(256):.3f}), ELE {ele:.3f}, CV² {stats.mean('cv2'):.3f}")
    for s in stats.values():
        print(f"  {s}")
    print(f"experts balanced (ELE > 0.9): {'yes' if ele > 0.9 else 'no'}; {time.perf_counter() - start:.1f}s in all")
    return {"history": history, "val_loss": val_loss, "ele": ele, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()

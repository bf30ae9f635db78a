"""GPU benchmark of moefx's MoE expert compute: the fused Triton kernels against the
alternatives, for SliceMoE and XMoE at the sizes of issue 5.

    python bench/gpu_moe.py                      # CUDA, bf16, T in {1, 128, 4096, 16384}
    python bench/gpu_moe.py --tokens 1 4096 --json out.json --table out.md
    TRITON_INTERPRET=1 python bench/gpu_moe.py --smoke   # tiny shapes on the CPU interpreter

Per configuration and batch size T it times the expert half of the layer (routing is computed
once beforehand and shared; each variant includes its own grouping of rows by expert):

- ``dense``: the dense FFN the layer replaces (cuBLAS, ``d -> d_ff -> d``). For SliceMoE it is
  also the FFN of equal FLOPs (``h_e = d_ff / k``); for XMoE, ``ideal = dense · active
  fraction`` (the share of the ``d_ff`` neurons a token uses) is the goal line.
- ``grouped_mm``: ``argsort`` by expert, gather, ``torch._grouped_mm`` twice, weight, scatter-add.
- ``unfused``: the lowered graph's primitive ops one by one (Triton counting sort, gather,
  Triton grouped GEMM, activation, Triton grouped GEMM, weighted scatter-add).
- ``fused``: Triton counting sort + gather+GEMM1+act kernel + GEMM2+weight+scatter kernel.
- ``fused_mlp`` (experts narrow enough, i.e. SliceMoE): counting sort + the whole-MLP kernel.

Separately, the router alone: ``moefx::route`` (one kernel) against the PyTorch chain, with a
check that both choose the same experts.

Timing: CUDA events around each call, warm-up first, median over ``--iters`` calls, inputs
rotated over several buffers so that no call finds its input in L2. Every variant's output is
checked against a float32 per-expert loop (``max_rel_err``). Results go to JSON and a Markdown table; the
``goals`` block says whether the fastest fused variant beat ``grouped_mm`` at every size and
came within 1.5x of ``ideal`` from 4096 tokens on.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moefx.kernels  # noqa: E402,F401
from moefx.kernels import fused as _fused  # noqa: E402,F401
from moefx.kernels import primitives as _prims  # noqa: E402,F401
from moefx.kernels import triton_moe as tm  # noqa: E402
from moefx.layers.activations import activation_fn  # noqa: E402

OPS = torch.ops.moefx

FULL_CONFIGS = [
    # SliceMoE: experts see d_model / num_slices wide rows, hidden d_ff // top_k, input gating.
    # XMoE: d_ff split into num_experts groups; threshold routing is given a router peaked
    # enough to keep about target_active experts per token (a random router keeps almost all).
    dict(name="slicemoe_d768_S8_E16_k2", kind="slicemoe", d_model=768, num_slices=8, d_ff=3072,
         num_experts=16, top_k=2, activation="gelu"),
    dict(name="xmoe_d2048_ff8192_E64_t0.9", kind="xmoe", d_model=2048, d_ff=8192, num_experts=64,
         threshold=0.9, target_active=8, activation="gelu"),
    dict(name="xmoe_d2048_ff8192_E64_top8", kind="xmoe", d_model=2048, d_ff=8192, num_experts=64,
         top_k=8, activation="gelu"),
]
SMOKE_CONFIGS = [
    dict(name="slicemoe_smoke", kind="slicemoe", d_model=96, num_slices=4, d_ff=48, num_experts=4,
         top_k=2, activation="gelu"),
    dict(name="xmoe_smoke_t0.9", kind="xmoe", d_model=32, d_ff=64, num_experts=8, threshold=0.9,
         target_active=3, activation="gelu"),
    dict(name="xmoe_smoke_top2", kind="xmoe", d_model=32, d_ff=64, num_experts=8, top_k=2,
         activation="gelu"),
]


class Problem:
    """One configuration at one batch size: weights, rotated inputs and their routing."""

    def __init__(self, cfg: dict, T: int, dtype, device, rotations: int, gen: torch.Generator):
        self.cfg = cfg
        self.T = T
        self.activation = cfg["activation"]
        E = cfg["num_experts"]
        d_model, d_ff = cfg["d_model"], cfg["d_ff"]
        if cfg["kind"] == "slicemoe":
            S, k = cfg["num_slices"], cfg["top_k"]
            self.d = d_model // S
            self.h = d_ff // k
            self.rows_per_token = S
            self.gate_input = True
        else:
            self.d = d_model
            self.h = math.ceil(d_ff / E)
            self.rows_per_token = 1
            self.gate_input = False
        d, h = self.d, self.h

        def rnd(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

        self.w1 = rnd(E, h, d, scale=d ** -0.5)
        self.b1 = rnd(E, h, scale=0.02)
        self.w2 = rnd(E, d, h, scale=h ** -0.5)
        self.b2 = rnd(E, d, scale=0.02) if cfg["kind"] == "slicemoe" else None
        self.dense_w1 = rnd(d_ff, d_model, scale=d_model ** -0.5)
        self.dense_b1 = rnd(d_ff, scale=0.02)
        self.dense_w2 = rnd(d_model, d_ff, scale=d_ff ** -0.5)
        N = T * self.rows_per_token
        self.inputs = []
        kept = []
        for _ in range(rotations):
            x = rnd(N, d, scale=1.0)
            idx, weight = self._routing(N, gen)
            kept.append(float((idx >= 0).sum()) / max(N, 1))
            self.inputs.append((x, idx.to(device), weight.to(device), rnd(T, d_model, scale=1.0)))
        self.mean_active = statistics.mean(kept)
        self.active_fraction = (
            1.0 if cfg["kind"] == "slicemoe" else self.mean_active * self.h / d_ff
        )

    def _routing(self, N: int, gen: torch.Generator):
        cfg, E = self.cfg, self.cfg["num_experts"]
        if "top_k" in cfg:
            logits = torch.randn(N, E, generator=gen, dtype=torch.float64) * 2
            probs = torch.softmax(logits, -1).float()
            w, idx = torch.topk(probs, cfg["top_k"], dim=-1)
            if cfg["kind"] == "slicemoe":
                w = w / w.sum(-1, keepdim=True)
            return idx, w
        scale = _threshold_scale(E, cfg["threshold"], cfg["target_active"])
        probs = torch.softmax(torch.randn(N, E, generator=gen, dtype=torch.float64) * scale, -1)
        values, order = torch.sort(probs.float(), dim=-1, descending=True)
        keep = (torch.cumsum(values, -1) - values) < cfg["threshold"]
        keep[:, 0] = True
        idx = torch.where(keep, order, -1)
        return idx, torch.where(keep, values, 0.0)


@functools.lru_cache(maxsize=None)
def _threshold_scale(E: int, threshold: float, target: float) -> float:
    """Logit scale at which the threshold rule keeps about ``target`` experts per token (a
    random router keeps nearly all of them; a trained one is peaked)."""
    gen = torch.Generator().manual_seed(123)
    sample = torch.randn(2048, E, generator=gen, dtype=torch.float64)

    def kept(scale):
        values, _ = torch.sort(torch.softmax(sample * scale, -1), dim=-1, descending=True)
        return float(((torch.cumsum(values, -1) - values) < threshold).sum(-1).double().mean())

    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) > target else (lo, mid)
    return (lo + hi) / 2


# ------------------------------------------------------------------ variants


def dense(p: Problem, inp):
    act = activation_fn(p.activation)
    return F.linear(act(F.linear(inp[3], p.dense_w1, p.dense_b1)), p.dense_w2)


def grouped_mm(p: Problem, inp):
    """The usual PyTorch recipe: sort slots by expert, read the number of routed rows back to
    the host (one synchronisation, as MegaBlocks' grouped path does; it keeps threshold
    routing's many empty slots out of the GEMMs), gather, two ``torch._grouped_mm``, weight,
    ``index_add_``."""
    x, idx, weight, _ = inp
    N, K = idx.shape
    E = p.w1.shape[0]
    flat = idx.reshape(-1)
    key = torch.where(flat >= 0, flat, E)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    M = int(offs[-1])
    slots = order[:M]
    expert = key[slots]
    tok = torch.div(slots, K, rounding_mode="floor")
    w = weight.reshape(-1)[slots].to(x.dtype).unsqueeze(1)
    xs = x.index_select(0, tok)
    if p.gate_input:
        xs = xs * w
    hid = torch._grouped_mm(xs, p.w1.transpose(1, 2), offs=offs) + p.b1.index_select(0, expert)
    hid = activation_fn(p.activation)(hid)
    out = torch._grouped_mm(hid, p.w2.transpose(1, 2), offs=offs)
    if p.b2 is not None:
        out = out + p.b2.index_select(0, expert)
    if not p.gate_input:
        out = out * w
    return torch.zeros((N, p.d), dtype=x.dtype, device=x.device).index_add_(0, tok, out)


def reference_fp32(p: Problem, inp):
    """The expert compute in float32 with a plain per-expert loop over the routed rows only:
    the yardstick for every variant's ``max_rel_err`` (shares no code with them)."""
    x, idx, weight, _ = inp
    N, K = idx.shape
    y = torch.zeros((N, p.d), dtype=torch.float32, device=x.device)
    act = activation_fn(p.activation)
    flat, w = idx.reshape(-1), weight.reshape(-1).float()
    for e in range(p.w1.shape[0]):
        slots = (flat == e).nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        tok = torch.div(slots, K, rounding_mode="floor")
        rows = x.index_select(0, tok).float()
        if p.gate_input:
            rows = rows * w[slots, None]
        out = F.linear(act(F.linear(rows, p.w1[e].float(), p.b1[e].float())), p.w2[e].float(),
                       None if p.b2 is None else p.b2[e].float())
        if not p.gate_input:
            out = out * w[slots, None]
        y.index_add_(0, tok, out)
    return y


def unfused(p: Problem, inp, block_m):
    x, idx, weight, _ = inp
    E = p.w1.shape[0]
    ss, be = OPS.dispatch(idx, E, block_m)
    rows = OPS.gather_rows(x, ss, weight, p.gate_input)
    hid = OPS.activation(OPS.grouped_gemm(rows, be, p.w1, p.b1), p.activation)
    out = OPS.grouped_gemm(hid, be, p.w2, p.b2)
    return OPS.combine(out, ss, weight, not p.gate_input)


def fused(p: Problem, inp, block_m):
    x, idx, weight, _ = inp
    ss, be = tm.align_blocks(idx, p.w1.shape[0], block_m)
    hid = tm.gather_gemm1(x, ss, be, weight, p.w1, p.b1, None, None, p.activation,
                          scale_input=p.gate_input)
    y = tm.gemm2_scatter(hid, ss, be, weight, p.w2, p.b2, apply_weight=not p.gate_input)
    return y.to(x.dtype)


def fused_mlp(p: Problem, inp, block_m):
    x, idx, weight, _ = inp
    ss, be = tm.align_blocks(idx, p.w1.shape[0], block_m)
    y = tm.expert_mlp(x, ss, be, weight, p.w1, p.b1, None, None, p.w2, p.b2, p.activation,
                      scale_input=p.gate_input, apply_weight=not p.gate_input)
    return y.to(x.dtype)


def time_router(p: Problem, cfg: dict, args, cuda: bool, gen: torch.Generator) -> list:
    """The router alone: ``moefx::route`` (one Triton kernel: fp32 linear, softmax, selection)
    against the PyTorch chain (fp32 linear, softmax, ``moefx::xmoe_select``, renormalisation).
    SliceMoE's router input is its ReLU hidden layer (``H_r = 256``, one row per slice)."""
    E = cfg["num_experts"]
    if cfg["kind"] == "slicemoe":
        width, threshold, top_k, renorm = 256, 0.0, cfg["top_k"], True
    else:
        width, renorm = cfg["d_model"], False
        threshold, top_k = (cfg["threshold"], 0) if "threshold" in cfg else (0.0, cfg["top_k"])
    rows = p.T * p.rows_per_token
    device, dtype = p.w1.device, p.w1.dtype
    w = (torch.randn(E, width, generator=gen) * width ** -0.5).to(dtype).to(device)
    xs = [(torch.randn(rows, width, generator=gen)).to(dtype).to(device) for _ in range(args.rotations)]

    def torch_router(x):
        probs = torch.softmax(F.linear(x.float(), w.float()), -1)
        idx, weight = OPS.xmoe_select(probs, threshold, top_k, 0)
        return idx, (weight / weight.sum(-1, keepdim=True)) if renorm else weight

    def fused_router(x):
        return tm.route(x, w, None, threshold, top_k, 0, renorm)[:2]

    out = []
    with torch.no_grad():
        for name, fn in (("router_torch", torch_router), ("router_fused", fused_router)):
            ms, (idx, _) = time_ms(fn, xs, args.warmup, args.iters, cuda)
            same = bool(torch.equal(idx, torch_router(xs[(args.iters - 1) % len(xs)])[0]))
            out.append(dict(config=cfg["name"], T=p.T, rows=rows, variant=name, ms=ms,
                            same_experts_as_torch=same))
            print(f"{cfg['name']:32s} T={p.T:6d} {name:12s} {ms:9.4f} ms", file=sys.stderr)
    return out


# ------------------------------------------------------------------ timing


def time_ms(fn, inputs, warmup: int, iters: int, cuda: bool):
    """``(median milliseconds of fn(inputs[i % len(inputs)]), output of the last call)``."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    if cuda:
        torch.cuda.synchronize()
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            out = fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def rel_err(y, ref) -> float:
    scale = ref.float().abs().max().clamp_min(1e-6)
    return float((y.float() - ref.float()).abs().max() / scale)


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("gpu_moe.py needs a CUDA device (or --smoke, which runs tiny shapes on "
                         "the Triton CPU interpreter)")
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    configs = SMOKE_CONFIGS if args.smoke else FULL_CONFIGS
    tokens = args.tokens or ([1, 4] if args.smoke else [1, 128, 4096, 16384])
    gen = torch.Generator().manual_seed(0)
    results, routers = [], []
    for cfg in configs:
        for T in tokens:
            p = Problem(cfg, T, dtype, device, args.rotations, gen)
            N = T * p.rows_per_token
            K = p.inputs[0][1].shape[1]
            block_m = args.block_m or tm.choose_block_m(int(p.mean_active * N), cfg["num_experts"])
            variants = {
                "dense": lambda inp, p=p: dense(p, inp),
                "grouped_mm": lambda inp, p=p: grouped_mm(p, inp),
                "unfused": lambda inp, p=p, block_m=block_m: unfused(p, inp, block_m),
                "fused": lambda inp, p=p, block_m=block_m: fused(p, inp, block_m),
            }
            if p.d <= tm.EXPERT_MLP_MAX_WIDTH:
                variants["fused_mlp"] = lambda inp, p=p, block_m=block_m: fused_mlp(p, inp, block_m)
            with torch.no_grad():
                last = p.inputs[(args.iters - 1) % len(p.inputs)]
                ref = reference_fp32(p, last)
                row = dict(config=cfg["name"], T=T, rows=N, slots_per_row=K, block_m=block_m,
                           mean_active=round(p.mean_active, 3),
                           active_fraction=round(p.active_fraction, 4))
                for name, fn in variants.items():
                    try:
                        ms, out = time_ms(fn, p.inputs, args.warmup, args.iters, cuda)
                    except Exception as err:  # noqa: BLE001  (one failing variant must not end the run)
                        results.append(dict(row, variant=name, ms=None, error=f"{type(err).__name__}: {err}"))
                        print(f"{cfg['name']:32s} T={T:6d} {name:10s} FAILED {err}", file=sys.stderr)
                        continue
                    entry = dict(row, variant=name, ms=ms)
                    if name != "dense":
                        entry["max_rel_err"] = rel_err(out, ref)
                    results.append(entry)
                    print(f"{cfg['name']:32s} T={T:6d} {name:10s} {ms:9.4f} ms", file=sys.stderr)
                routers.extend(time_router(p, cfg, args, cuda, gen))
            del p
            if cuda:
                torch.cuda.empty_cache()
    return dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, smoke test)",
        dtype=args.dtype, torch=torch.__version__, iters=args.iters, warmup=args.warmup,
        rotations=args.rotations, tiles=dict(tm.TILE_OVERRIDES), results=results, goals=goals(results, measured=cuda),
        router=routers,
    )


def goals(results, measured: bool = True) -> dict:
    """Issue 5's goals per (config, T): the fastest fused variant at most ``grouped_mm``'s
    time; from 4096 tokens on, within 1.5x of ``ideal = dense · active fraction``. Interpreter
    timings say nothing about a GPU: ``all_met`` is None for them."""
    table = {}
    for r in results:
        if r["ms"] is not None:
            table.setdefault((r["config"], r["T"]), {})[r["variant"]] = r
    out = []
    for (config, T), v in table.items():
        fused = [v[n]["ms"] for n in ("fused", "fused_mlp") if n in v]
        if not fused or "dense" not in v or "grouped_mm" not in v:
            out.append(dict(config=config, T=T, incomplete=sorted(v)))
            continue
        fused_ms = min(fused)
        ideal = v["dense"]["ms"] * v["dense"]["active_fraction"]
        entry = dict(config=config, T=T, fused_ms=fused_ms, grouped_mm_ms=v["grouped_mm"]["ms"],
                     ideal_ms=ideal, beats_grouped_mm=fused_ms <= v["grouped_mm"]["ms"])
        if T >= 4096:
            entry["within_1.5x_ideal"] = fused_ms <= 1.5 * ideal
        out.append(entry)
    met = all(e.get("beats_grouped_mm", False) and e.get("within_1.5x_ideal", True) for e in out)
    return dict(per_size=out, all_met=met if measured else None)


def table(data: dict) -> str:
    rows = {}
    for r in data["results"]:
        rows.setdefault((r["config"], r["T"]), {})[r["variant"]] = r
    names = ["dense", "grouped_mm", "unfused", "fused", "fused_mlp"]
    lines = [f"device: {data['device']}, dtype {data['dtype']}, median of {data['iters']} (ms)", "",
             "| config | T | active | " + " | ".join(names) + " | ideal | fused/grouped_mm | fused/ideal |",
             "|---|---|---|" + "---|" * (len(names) + 3)]
    for g in data["goals"]["per_size"]:
        v = rows[(g["config"], g["T"])]
        cells = [f"{v[n]['ms']:.4f}" if n in v and v[n]["ms"] is not None else
                 ("FAILED" if n in v else "-") for n in names]
        if "incomplete" in g:
            lines.append(f"| {g['config']} | {g['T']} | - | " + " | ".join(cells) + " | - | - | - |")
            continue
        lines.append(
            f"| {g['config']} | {g['T']} | {v['dense']['mean_active']} | " + " | ".join(cells)
            + f" | {g['ideal_ms']:.4f} | {g['fused_ms'] / g['grouped_mm_ms']:.2f} | {g['fused_ms'] / g['ideal_ms']:.2f} |"
        )
    lines.append("")
    lines.append(f"all goals met: {data['goals']['all_met']}")
    lines += ["", "| router | T | torch (ms) | fused route (ms) | same experts |", "|---|---|---|---|---|"]
    pairs = {}
    for r in data["router"]:
        pairs.setdefault((r["config"], r["T"]), {})[r["variant"]] = r
    for (config, T), v in pairs.items():
        lines.append(f"| {config} | {T} | {v['router_torch']['ms']:.4f} | {v['router_fused']['ms']:.4f} | "
                     f"{v['router_fused']['same_experts_as_torch']} |")
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    """Write through a temporary file and ``os.replace``: never a half-written result file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the Triton CPU interpreter")
    ap.add_argument("--tokens", type=int, nargs="*", help="batch sizes T (default 1 128 4096 16384)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rotations", type=int, default=None, help="input buffers cycled between calls")
    ap.add_argument("--block-m", type=int, default=None, help="rows per block (default: by rows per expert)")
    ap.add_argument("--tiles", default=None,
                    help='JSON tile overrides per kernel, e.g. \'{"gemm2_scatter": {"BN": 64, "num_warps": 4}}\'')
    ap.add_argument("--json", default=None,
                    help="write results here (default bench/gpu_moe.json, bench/gpu_moe_smoke.json with --smoke)")
    ap.add_argument("--table", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or "bfloat16"
    args.iters = args.iters or (1 if args.smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 10)
    args.rotations = args.rotations or (1 if args.smoke else 4)
    if args.tiles:
        tm.TILE_OVERRIDES.update(json.loads(args.tiles))
    data = run(args)
    text = table(data)
    print(text)
    json_path = args.json or str(Path(__file__).with_name("gpu_moe_smoke.json" if args.smoke else "gpu_moe.json"))
    _write(json_path, json.dumps(data, indent=1))
    if args.table:
        _write(args.table, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

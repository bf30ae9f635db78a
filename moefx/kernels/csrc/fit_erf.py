"""Derive the rational erf approximation used by moefx_cpu.c (run: python fit_erf.py).

erf(z) ~= z * P(z^2) / Q(z^2) on |z| <= ZMAX with deg P = 5, deg Q = 5, Q(0) = 1. Coefficients
come from an iteratively re-weighted linear least-squares fit (P(y) - f(y) (Q(y) - 1) = f(y),
weighted by z / |Q|, which converges towards the minimax error of z * P / Q - erf(z)) on 4000
Chebyshev nodes. Past ZMAX = 3.92, erf(z) rounds to 1 in float32, so the kernel clamps z there.
Prints the coefficients and the float64 and float32 maximum absolute errors.
"""
from math import erf

import numpy as np

ZMAX = 3.92
NUM, DEN = 6, 5  # coefficients of P (degree 5 in y = z^2) and of Q beyond its constant 1


def fit(iters: int = 30):
    z = (np.cos(np.linspace(np.pi, 0, 4000)) + 1) / 2 * ZMAX
    z[0] = 1e-6
    y = z * z
    f = np.array([erf(v) / v for v in z])
    q_abs = np.ones_like(z)
    for _ in range(iters):
        a = np.hstack([np.vander(y, NUM, increasing=True), -f[:, None] * np.vander(y, DEN + 1, increasing=True)[:, 1:]])
        w = z / q_abs
        coef, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = coef[:NUM], np.concatenate([[1.0], coef[NUM:]])
        q_abs = np.abs(np.polyval(q[::-1], y))
    err = np.abs(z * np.polyval(p[::-1], y) / np.polyval(q[::-1], y) - z * f).max()
    return p, q, err


def float32_error(p, q) -> float:
    z = np.linspace(-6, 6, 200001).astype(np.float32)
    zc = np.clip(z, -ZMAX, ZMAX).astype(np.float32)
    y = zc * zc
    pv, qv = np.zeros_like(y), np.zeros_like(y)
    for c in p[::-1]:
        pv = pv * y + np.float32(c)
    for c in q[::-1]:
        qv = qv * y + np.float32(c)
    approx = (zc * pv / qv).astype(np.float64)
    return float(np.abs(approx - np.array([erf(float(v)) for v in z])).max())


if __name__ == "__main__" and "exp" not in __import__("sys").argv[1:]:
    p, q, err = fit()
    print("P:", ", ".join(f"{v:.9e}f" for v in p))
    print("Q:", ", ".join(f"{v:.9e}f" for v in q))
    print(f"max |error| in float64: {err:.2e}; evaluated in float32: {float32_error(p, q):.2e}")


# ---------------------------------------------------------------- exp, for silu and friends
#
# e^r ~= 1 + r + r^2 R(r) on |r| <= ln2/2 (after e^x = 2^n e^r), R of degree 5, fitted by
# least squares on the relative error of e^r at 2000 Chebyshev nodes. Run: python fit_erf.py exp


def fit_exp():
    half = np.log(2) / 2
    r = np.cos(np.linspace(np.pi, 0, 2000)) * half
    r = r[np.abs(r) > 1e-4]
    target = (np.exp(r) - 1 - r) / (r * r)
    a = np.vander(r, 6, increasing=True)
    w = (r * r) / np.exp(r)  # error of e^r relative to e^r
    coef, *_ = np.linalg.lstsq(a * w[:, None], target * w, rcond=None)
    approx = 1 + r + r * r * np.polyval(coef[::-1], r)
    return coef, float(np.abs(approx / np.exp(r) - 1).max())


if __name__ == "__main__" and "exp" in __import__("sys").argv[1:]:
    c, rel = fit_exp()
    print("R:", ", ".join(f"{v:.10e}f" for v in c))
    print(f"max relative error of e^r in float64: {rel:.2e}")

"""An independent fp64 reference for the block-scaled formats, written from their definitions
(issue 16) and never calling lowbit.mx.

Element values come from decoding every bit pattern of the format (sign, exponent, mantissa,
bias); rounding is a nearest-value search over them, ties to the even code. Block amaxes are taken
slice by slice, a short last block as it is, so zero padding is not assumed either. The scales the rules
define as fp32 numbers (fp8-blockwise's amax / 448, nvfp4's two levels) and the divisions by them
are done in fp32, as the rules say; everything else in fp64.
"""

from __future__ import annotations

import functools

import torch

# element -> (exponent bits, mantissa bits, bias, codes that are not finite numbers)
_ENCODINGS = {
    "e4m3": (4, 3, 7, {0b1111111}),  # e4m3fn: no inf, S.1111.111 is NaN
    "e5m2": (5, 2, 15, set(range(0b1111100, 0b1111111 + 1))),  # exponent 31: inf / NaN
    "e2m1": (2, 1, 1, set()),
}
EMAX_ELEM = {"e4m3": 8, "e5m2": 15, "e2m1": 2}
# format -> (element, block, scale kind)
FORMATS = {
    "mxfp8": ("e4m3", 32, "e8m0"),
    "mxfp8-e5m2": ("e5m2", 32, "e8m0"),
    "mxfp4": ("e2m1", 32, "e8m0"),
    "nvfp4": ("e2m1", 16, "nvfp4"),
    "fp8-blockwise": ("e4m3", 128, "fp32"),
}


@functools.cache
def element_values(element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes): every finite non-negative value of `element` in fp64, with its bit code."""
    ebits, mbits, bias, special = _ENCODINGS[element]
    values, codes = [], []
    for code in range(2 ** (ebits + mbits)):
        if code in special:
            continue
        e, m = code >> mbits, code & (2**mbits - 1)
        if e == 0:
            value = 2.0 ** (1 - bias) * m / 2**mbits
        else:
            value = 2.0 ** (e - bias) * (1 + m / 2**mbits)
        values.append(value)
        codes.append(code)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(codes)


def round_ref(y: torch.Tensor, element: str) -> torch.Tensor:
    """Nearest `element` value to each y (fp64), ties to the even code; beyond the max -> the max."""
    values, codes = element_values(element)
    y = y.double()
    dist = (y.abs().reshape(-1, 1) - values).abs()
    best = dist.min(dim=1, keepdim=True).values
    # Among the nearest values (one, or two at a tie), prefer the even code.
    candidates = (dist == best) & ((codes % 2 == 0) | ((dist == best).sum(1, keepdim=True) == 1))
    q = values[candidates.int().argmax(dim=1)].reshape(y.shape)
    q = torch.copysign(q, y)
    return torch.where(torch.isnan(y), torch.nan, q)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for fp64 a > 0, corrected should log2 round across a power of two."""
    e = torch.floor(torch.log2(a))
    e = e - (torch.exp2(e) > a).double()
    return e + (torch.exp2(e + 1) <= a).double()


def _f32(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def block_amax(x: torch.Tensor, block: int, rows: int = 1) -> torch.Tensor:
    """Each element's block amax (fp64, NaN where the block holds NaN), slicing block by block."""
    out = torch.empty_like(x)
    for r0 in range(0, x.shape[0], rows):
        for c0 in range(0, x.shape[1], block):
            blk = x[r0 : r0 + rows, c0 : c0 + block]
            amax = torch.nan if torch.isnan(blk).any() else blk.abs().max().item()
            out[r0 : r0 + rows, c0 : c0 + block] = amax
    return out


def quantize_ref(x: torch.Tensor, fmt: str, *, weight_rows: int = 1) -> torch.Tensor:
    """x (R, K) -> its dequantized fp64 values in `fmt`, blocks along K (and `weight_rows` rows)."""
    element, block, kind = FORMATS[fmt]
    x = x.double()
    if x.numel() == 0:
        return x
    amax = block_amax(x, block, weight_rows)
    if kind == "e8m0":
        exponent = (_floor_log2(amax) - EMAX_ELEM[element]).clamp(-127, 127)
        scale = torch.exp2(torch.where(amax > 0, exponent, 0.0))
        out = round_ref(x / scale, element) * scale
    elif kind == "fp32":
        scale = torch.where(amax > 0, _f32(amax) / _f32(448.0), 1.0)
        out = round_ref(x.float() / scale, element) * scale.double()
    else:  # nvfp4: the block scale amax / 6 in e4m3, relative to the fp32 tensor scale
        amax_t = _f32(amax.max())
        tensor_scale = torch.where(amax_t > 0, amax_t / _f32(448.0 * 6.0), 1.0)
        block_scale = round_ref((_f32(amax) / _f32(6.0)) / tensor_scale, "e4m3").float()
        step = torch.where(block_scale > 0, block_scale * tensor_scale, 1.0)
        q = torch.where(block_scale > 0, round_ref(x.float() / step, element), 0.0)
        out = q * block_scale.double() * tensor_scale.double()
        if not torch.isfinite(amax_t):
            out = torch.full_like(x, torch.nan)
    # An inf/NaN block is NaN (E8M0's NaN scale; a NaN fp32 scale), a zero block zero.
    return torch.where(torch.isfinite(amax), torch.where(amax > 0, out, 0.0), torch.nan)


def weight_rows(fmt: str) -> int:
    return 128 if fmt == "fp8-blockwise" else 1


def block_linear_ref(x, w, b, g, fmt: str, grad_weight: str = "high"):
    """fp64 out, grad_input, grad_weight, grad_bias for x (M, K), w (N, K), g (M, N)."""
    x, w, g = x.double(), w.double(), g.double()
    rows = weight_rows(fmt)
    out = quantize_ref(x, fmt) @ quantize_ref(w, fmt, weight_rows=rows).T
    # g @ w reduces over N: g blocked along N, w.T (K, N) blocked along N (as a weight).
    grad_input = quantize_ref(g, fmt) @ quantize_ref(w.T, fmt, weight_rows=rows).T
    if grad_weight == "high":
        grad_w = g.T @ x
    else:  # g.T @ x reduces over M: both blocked along M, as activations
        grad_w = quantize_ref(g.T, fmt) @ quantize_ref(x.T, fmt).T
    bias = b.double() if b is not None else 0.0
    return out + bias, grad_input, grad_w, g.sum(0)

"""An independent fp64 reference for the float8 rule in DESIGN.md, never calling the code under test.

fp8 rounding is written from the formats' definitions (sign, exponent, mantissa bits), not with
torch's float8 cast, so the cast itself is checked too.
"""

import torch

# name -> (mantissa bits, exponent of the smallest normal, largest finite value)
FORMATS = {
    "e4m3": (3, -6, 448.0),
    "e5m2": (2, -14, 57344.0),
}


def round_fp8(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Nearest fp8 value of `fmt` to fp64 y (ties to even), saturating at +-max."""
    mbits, emin, fmax = FORMATS[fmt]
    y = y.double().clamp(-fmax, fmax)
    _, exp = torch.frexp(y)  # |y| = m * 2**exp, m in [0.5, 1): the leading bit is 2**(exp - 1)
    e = (exp - 1).clamp(min=emin).double()  # subnormals share the smallest normal's spacing
    step = torch.exp2(e - mbits)
    return (torch.round(y / step) * step).clamp(-fmax, fmax)  # torch.round: half to even


def fake_fp8(x: torch.Tensor, fmt: str, dim: int | None) -> torch.Tensor:
    """x cast to fp8 with an amax scale over `dim` (None: the whole tensor) and back, in fp64."""
    fmax = FORMATS[fmt][2]
    x = x.detach().double()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    # The rule's scale and x * scale are fp32 numbers: with 16-bit inputs x * scale often lands on an
    # exact fp8 tie (x / amax is a short fraction), which fp64 arithmetic would break either way.
    scale = torch.where(amax > 0, fmax / amax, torch.ones_like(amax)).float()
    return round_fp8(x.float() * scale, fmt) / scale.double()


def float8_linear_ref(x, w, b, g, recipe: str):
    """fp64 out, grad_input, grad_weight, grad_bias of the recipe, for x (M, K), w (N, K), g (M, N)."""
    x, w, g = x.double(), w.double(), g.double()
    if recipe == "tensorwise":
        x_hat = fake_fp8(x, "e4m3", None)
        g_hat = fake_fp8(g, "e5m2", None)
        w_hat = fake_fp8(w, "e4m3", None)
        out = x_hat @ w_hat.T
        grad_input = g_hat @ w_hat
        grad_weight = g_hat.T @ x_hat
    else:
        w_hat = fake_fp8(w, "e4m3", None)
        out = fake_fp8(x, "e4m3", 1) @ w_hat.T
        grad_input = fake_fp8(g, "e5m2", 1) @ w_hat
        grad_weight = g.T @ x  # high precision
    bias = b.double() if b is not None else 0.0
    return out + bias, grad_input, grad_weight, g.sum(0)

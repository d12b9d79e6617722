"""Independent fp64 references, written from the rules in DESIGN.md, never from the code under test."""

import torch


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(|ref| / |ref - x|) in dB, computed in fp64."""
    ref = ref.detach().double().cpu()
    err = (ref - x.detach().double().cpu()).norm()
    if err == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / err))


def quantize_ref(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 absmax int8 over `dim` (None: the whole tensor): q = round(127 x / absmax), 0 where absmax is 0.

    Returns q as fp64 integers and absmax as fp64 (keepdim, so it broadcasts against x).
    """
    x = x.detach().double()
    absmax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    q = torch.where(absmax > 0, torch.round(127.0 * x / absmax), torch.zeros_like(x))
    return q, absmax


def dequantize_ref(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return q * absmax / 127.0

"""StableAdamW: AdamW with Adafactor-style update clipping (Wortsman, Dettmers et al., 2023)."""

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lowbit._backend import triton_can_run, use_triton
from lowbit._inputs import FLOAT_DTYPES

try:  # FSDP2 shards parameters as DTensors; torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor = Replicate = None

# torch 2.11's DTensor has no sharding rule for _foreach_lerp_.ScalarList or _foreach_clamp_min.Scalar
# (NotImplementedError); 2.14's has both. Before 2.14 (versions between untested), DTensors take equal ops.
_DTENSOR_FOREACH_GAPS = torch.__version__ < (2, 14)  # a TorchVersion: compares as a version

__all__ = ["StableAdamW"]


class StableAdamW(torch.optim.Optimizer):
    r"""AdamW with per-tensor update clipping, as in "Stable and low-precision training for
    large-scale vision-language models" (Wortsman, Dettmers et al., 2023, arXiv:2304.13013).

    For every parameter tensor theta with gradient g at its step t = 1, 2, ...::

        b1_hat = b1 (1 - b1^(t-1)) / (1 - b1^t)          # bias correction folded into the betas
        b2_hat = b2 (1 - b2^(t-1)) / (1 - b2^t)          # (both are 0 at t = 1)
        v      = b1_hat v + (1 - b1_hat) g
        u      = b2_hat u + (1 - b2_hat) g^2
        RMS    = sqrt(mean(g^2 / max(u, eps^2)))         # per tensor, with the updated u
        eta    = lr / max(1, RMS / clip_threshold)
        theta  = theta - eta wd theta - eta v / (sqrt(u) + eps)

    The clipped step size eta scales the decoupled weight decay as well as the update, as in the
    paper's reference implementation.

    State per parameter (``optimizer.state[p]``), named as in ``torch.optim.AdamW`` so tools that
    read AdamW's state read this one too:

    - ``"step"``: t, a 0-dim fp32 tensor on the CPU (as in torch's Adam), so the bias correction
      is computed on the host without reading anything back from the device.
    - ``"exp_avg"``: v, the parameter's shape and device.
    - ``"exp_avg_sq"``: u, the parameter's shape and device.
    - ``"rms"``: the RMS of the last step, a 0-dim tensor on the parameter's device; read it
      (e.g. from a loss-spike monitor) without a host synchronisation.

    The state is fp64 for fp64 parameters and fp32 for all others: for bf16 / fp16 parameters the
    update is computed in fp32 and rounded to the parameter's dtype once, when written back; fp64
    parameters are updated in fp64 throughout.

    Nothing in a step synchronises the host with the device: RMS and eta stay device tensors.
    ``foreach=True`` runs ``torch._foreach_*`` ops over the parameters of a group bucketed by
    device and dtype; ``foreach=False`` runs one tensor at a time. Both compute the same ops.

    Steps skipped by ``torch.amp.GradScaler`` (inf / NaN gradients) leave parameters and state
    untouched, because ``GradScaler.step`` then does not call ``step``.

    Args:
        params: parameters or dicts defining parameter groups.
        lr: learning rate, >= 0.
        betas: (b1, b2), each in [0, 1).
        eps: >= 2**-63 (about 1.08e-19, so that eps^2 is a normal fp32 number); added to sqrt(u) and,
            squared, the floor of u in the RMS.
        weight_decay: decoupled weight decay, >= 0 (multiplied by eta, i.e. by lr).
        clip_threshold: RMS above which the step size is scaled down, > 0.
        foreach: True / False for the foreach / per-tensor implementation; None picks foreach
            for groups whose parameters are all on CUDA.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip_threshold: float = 1.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "clip_threshold": clip_threshold,
            "foreach": foreach,
        }
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        # Block layouts of the Triton step, keyed by (device, tensor sizes): what they hold is a
        # function of the key alone, so an entry can never be stale.
        self._layouts: dict = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # A group may override the defaults, so check what it ends up with.
        _check_hyperparameters(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        for group in self.param_groups:
            group.setdefault("foreach", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads like ``torch.optim.Optimizer``, but keeps v, u and rms in the state dtype (fp32, or
        fp64 for fp64 parameters) and the step on the CPU.

        The base class casts floating-point state to the parameter's dtype, which would round the
        fp32 moments of bf16 / fp16 parameters; they are restored here from the saved tensors.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq", "rms"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=_state_dtype(p.dtype), copy=True)
            if "step" in saved:
                state["step"] = torch.as_tensor(saved["step"]).to(
                    device="cpu", dtype=torch.float32, copy=True
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimisation step.

        Args:
            closure: optional, re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, rmss, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"StableAdamW does not support sparse gradients (got layout {p.grad.layout}); "
                        "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
                    )
                if not p.is_floating_point():
                    raise RuntimeError(
                        f"StableAdamW supports real floating-point parameters only, got {p.dtype}"
                    )
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    dtype = _state_dtype(p.dtype)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["rms"] = torch.zeros((), dtype=dtype, device=p.device)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                rmss.append(state["rms"])
                steps.append(state["step"])
            if not params:
                continue

            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.device.type == "cuda" for p in params)
            beta1, beta2 = group["betas"]
            extra = {"layouts": self._layouts} if foreach else {}
            update_fn = _foreach_stable_adamw if foreach else _single_tensor_stable_adamw
            update_fn(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                rmss,
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                clip_threshold=group["clip_threshold"],
                **extra,
            )
        return loss


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raises ValueError for a hyperparameter outside its range (NaN included)."""
    lr, betas, eps = group["lr"], group["betas"], group["eps"]
    if isinstance(lr, Tensor) or not 0.0 <= lr < float("inf"):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if eps * eps < _MIN_EPS_SQ:  # the fp32 floor of u would round to 0, and 0 / 0 is NaN
        raise ValueError(
            f"eps must be >= 2**-63 (about 1.08e-19), so that eps^2, the floor of u in the RMS, is a "
            f"normal fp32 number; got {eps!r}"
        )
    if not 0.0 <= group["weight_decay"] < float("inf"):
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    if not 0.0 < group["clip_threshold"] < float("inf"):
        raise ValueError(f"clip_threshold must be > 0, got {group['clip_threshold']!r}")
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")


# eps^2 floors u in fp32: below the smallest normal fp32 number it would round towards 0.
_MIN_EPS_SQ = torch.finfo(torch.float32).tiny


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the state and of the update arithmetic: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _folded_beta(beta: float, t: float) -> float:
    """b (1 - b^(t-1)) / (1 - b^t): Adam's bias correction folded into the decay rate (0 at t = 1)."""
    return beta * (1.0 - beta ** (t - 1)) / (1.0 - beta**t)


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """A reduction over a sharded DTensor (FSDP2) as a plain tensor: the sum over all shards."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like_param(scalar: Tensor, param: Tensor) -> Tensor:
    """The 0-dim step size, replicated over the parameter's mesh when the parameter is a DTensor."""
    if _is_dtensor(param):
        return DTensor.from_local(scalar, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    return scalar


def _single_tensor_stable_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rmss: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_threshold: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, rms_state, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, rmss, steps
    ):
        # t = t + 1; step lives on the CPU, so reading it back does not wait for the device
        step += 1
        t = step.item()
        # b_hat = b (1 - b^(t-1)) / (1 - b^t)
        beta1_hat, beta2_hat = _folded_beta(beta1, t), _folded_beta(beta2, t)
        # The update is computed in the state dtype (no copies for fp32 / fp64); grad is never written.
        grad_hp = grad.to(exp_avg.dtype)
        param_hp = param.to(exp_avg.dtype)

        # v = b1_hat v + (1 - b1_hat) g
        exp_avg.lerp_(grad_hp, 1.0 - beta1_hat)
        # u = b2_hat u + (1 - b2_hat) g^2
        exp_avg_sq.mul_(beta2_hat).addcmul_(grad_hp, grad_hp, value=1.0 - beta2_hat)
        # RMS = sqrt(mean(g^2 / max(u, eps^2))), with the updated u; the ratio is >= 0, so its sum
        # is its L1 norm (the reduction the foreach path has); an empty tensor gets RMS 0
        ratio = grad_hp.square().div_(exp_avg_sq.clamp_min(eps * eps))
        rms = (_full(torch.linalg.vector_norm(ratio, 1)) / max(ratio.numel(), 1)).sqrt_()
        del ratio
        rms_state.copy_(rms)
        # eta = lr / max(1, RMS / clip_threshold), a device tensor: no host synchronisation
        eta = _like_param(rms.div_(clip_threshold).clamp_min_(1.0).reciprocal_().mul_(lr), param)
        # theta = theta - eta (wd theta + v / (sqrt(u) + eps)): decoupled weight decay, clipped like
        # the update; the foreach path's ops in the same order
        update = exp_avg_sq.sqrt().add_(eps)
        torch.div(exp_avg, update, out=update)
        if weight_decay != 0.0:
            update.add_(param_hp, alpha=weight_decay)
        param_hp.sub_(update.mul_(eta))
        if param_hp is not param:
            param.copy_(param_hp)


def _foreach_stable_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rmss: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_threshold: float,
    layouts: dict | None = None,
) -> None:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)

    for (_, dtype), idx in buckets.items():
        b_params = [params[i] for i in idx]
        b_grads = [grads[i] for i in idx]
        b_exp_avgs = [exp_avgs[i] for i in idx]
        b_exp_avg_sqs = [exp_avg_sqs[i] for i in idx]
        b_rmss = [rmss[i] for i in idx]
        b_steps = [steps[i] for i in idx]

        # t = t + 1; steps live on the CPU, so reading them back does not wait for the device
        torch._foreach_add_(b_steps, 1.0)
        ts = [s.item() for s in b_steps]
        # b_hat = b (1 - b^(t-1)) / (1 - b^t), per tensor (a tensor may have skipped steps)
        beta1_hats = [_folded_beta(beta1, t) for t in ts]
        beta2_hats = [_folded_beta(beta2, t) for t in ts]
        scalars = (eps, weight_decay, clip_threshold)
        if _triton_step_applies(b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, scalars):
            _triton_step(b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_rmss, beta1_hats, beta2_hats,
                         layouts if layouts is not None else {}, lr=lr, eps=eps, weight_decay=weight_decay,
                         clip_threshold=clip_threshold)
            continue
        # The update is computed in the state dtype (no copies for fp32 / fp64); grads are never written.
        needs_copy = dtype != b_exp_avgs[0].dtype  # bf16 / fp16
        grads_hp = _copies(b_grads, b_exp_avgs[0].dtype) if needs_copy else b_grads
        params_hp = _copies(b_params, b_exp_avgs[0].dtype) if needs_copy else b_params

        # v = b1_hat v + (1 - b1_hat) g
        _foreach_lerp_(b_exp_avgs, grads_hp, [1.0 - b for b in beta1_hats])
        # u = b2_hat u + (1 - b2_hat) g^2
        torch._foreach_mul_(b_exp_avg_sqs, beta2_hats)
        torch._foreach_addcmul_(b_exp_avg_sqs, grads_hp, grads_hp, [1.0 - b for b in beta2_hats])
        # RMS = sqrt(mean(g^2 / max(u, eps^2))), with the updated u; sum via the L1 norm (ratio >= 0)
        ratios = torch._foreach_mul(grads_hp, grads_hp)
        torch._foreach_div_(ratios, _foreach_clamp_min(b_exp_avg_sqs, eps * eps))
        sums = [_full(n) for n in torch._foreach_norm(ratios, 1)]
        del ratios
        torch._foreach_div_(sums, [float(max(r.numel(), 1)) for r in b_params])
        rms = torch.stack(sums).sqrt_()
        torch._foreach_copy_(b_rmss, list(rms.unbind(0)))
        # eta = lr / max(1, RMS / clip_threshold), device tensors: no host synchronisation
        etas = list(rms.div_(clip_threshold).clamp_min_(1.0).reciprocal_().mul_(lr).unbind(0))
        # theta = theta - eta (wd theta + v / (sqrt(u) + eps)): decoupled weight decay, clipped like
        # the update. Every op takes lists of same-shaped tensors (PyTorch's multi-tensor fast path);
        # DTensors (FSDP2) are updated through their local shards, eta being the same on every rank.
        denoms = torch._foreach_sqrt(b_exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        updates = [_local(u) for u in torch._foreach_div(b_exp_avgs, denoms)]
        del denoms
        params_local = [_local(p) for p in params_hp]
        if weight_decay != 0.0:
            torch._foreach_add_(updates, params_local, alpha=weight_decay)
        torch._foreach_mul_(updates, _broadcast_each(etas, updates))
        torch._foreach_sub_(params_local, updates)
        del updates
        if needs_copy:
            torch._foreach_copy_(b_params, params_hp)


def _triton_step_applies(params, grads, exp_avgs, exp_avg_sqs, scalars=()) -> bool:
    """Whether lowbit's backend picks its Triton kernels for these tensors and the kernel takes them.

    The kernel walks raw addresses by each parameter's size, so every tensor must be what it assumes:
    fp32 / bf16 / fp16 parameters, each once; gradients of their shape and dtype; fp32 state of their
    shape (a state dict loaded for other parameters may not be); all contiguous, on one device, no
    DTensors; hyperparameters the kernels take as fp32 scalars Python numbers (not 0-dim tensors).
    Anything else gets the foreach ops, and their errors.
    """
    if any(isinstance(s, Tensor) for s in scalars):
        return False
    first = params[0]
    if first.dtype not in FLOAT_DTYPES or torch.compiler.is_compiling():
        return False  # (traced by torch.compile: the foreach ops, which it knows how to compile)
    # CPU parameters (offloaded groups) outside the interpreter: foreach, whatever LOWBIT_BACKEND asks
    if not triton_can_run(first) or not use_triton(first):
        return False
    tensors = (*params, *grads, *exp_avgs, *exp_avg_sqs)
    if not all(not _is_dtensor(t) and t.is_contiguous() and t.device == first.device for t in tensors):
        return False
    if len({p.data_ptr() for p in params if p.numel()}) != sum(1 for p in params if p.numel()):
        return False  # one tensor twice: its blocks would race on the same state
    return all(
        g.shape == p.shape and g.dtype == p.dtype
        and v.shape == u.shape == p.shape and v.dtype == u.dtype == torch.float32
        for p, g, v, u in zip(params, grads, exp_avgs, exp_avg_sqs)
    )


def _triton_step(params, grads, exp_avgs, exp_avg_sqs, rmss, beta1_hats, beta2_hats, layouts, **hyper) -> None:
    """The foreach step in three Triton launches over every tensor (lowbit/kernels/stable_adamw.py)."""
    from lowbit.kernels import stable_adamw as kernel  # imported on first use: lowbit imports without Triton

    key = (params[0].device, tuple(p.numel() for p in params))
    if key not in layouts:
        if len(layouts) >= 64:  # parameters whose gradients come and go: keep the cache bounded
            layouts.clear()
        layouts[key] = kernel.block_layout(key[1], key[0])
    per_tensor = [x for b1, b2 in zip(beta1_hats, beta2_hats) for x in (1.0 - b1, b2, 1.0 - b2)]
    rms = kernel.stable_adamw_step(params, grads, exp_avgs, exp_avg_sqs, per_tensor, layouts[key], **hyper)
    torch._foreach_copy_(rmss, list(rms.unbind(0)))


def _foreach_lerp_(starts: list[Tensor], ends: list[Tensor], weights: list[float]) -> None:
    """torch._foreach_lerp_ with one weight per tensor (tensor by tensor for DTensors on torch < 2.14)."""
    if _DTENSOR_FOREACH_GAPS and any(_is_dtensor(t) for t in starts):
        for start, end, weight in zip(starts, ends, weights):
            start.lerp_(end, weight)
        return
    torch._foreach_lerp_(starts, ends, weights)


def _foreach_clamp_min(tensors: list[Tensor], value: float) -> list[Tensor]:
    """torch._foreach_clamp_min (as clones clamped in place for DTensors on torch < 2.14)."""
    if _DTENSOR_FOREACH_GAPS and any(_is_dtensor(t) for t in tensors):
        out = [t.clone() for t in tensors]
        torch._foreach_clamp_min_(out, value)
        return out
    return torch._foreach_clamp_min(tensors, value)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: in-place ops write through), any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _copies(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Copies of `tensors` in `dtype`, made by one `_foreach_copy_` rather than one cast per tensor."""
    out = [torch.empty_like(t, dtype=dtype) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def _broadcast_each(scalars: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
    """scalars[i] (0-dim) spread to tensors[i]'s shape and strides, all views of one flat buffer.

    `_foreach_mul_` by a list of 0-dim tensors leaves the multi-tensor fast path (it wants the same
    shapes pair by pair) and runs one kernel per tensor; this costs one full-size temporary and a
    `cat` instead. `tensors` must be dense (the outputs of `_foreach_*` ops on the dense state are).
    """
    flat = torch.cat([s.expand(t.numel()) for s, t in zip(scalars, tensors)])
    views, offset = [], 0
    for t in tensors:
        views.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return views

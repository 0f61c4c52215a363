"""Measured entropy change: one real optimizer step from the same checkpoint, then H' − H.

The step minimises the batch objective (by default the GRPO token-mean clipped surrogate) with
plain SGD or AdamW; the model is restored afterwards so several steps (learning rates, methods)
can be measured from the same parameters.

Every tensor the step builds lives on the model's device (the loss's per-token inputs are moved
there once, when the loss is made). Over several processes each rank accumulates the gradient of
its own sequences, normalised by the token count L of the whole batch, and a ``reduce`` hook sums
the gradients across ranks before the optimizer runs (data-parallel semantics: the step equals
the single-process step, :mod:`entropy_lens.collectives`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from entropy_lens.methods.base import (
    GRPO_DUAL_CLIP,
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    LOG_RATIO_CLAMP,
    MethodTerms,
)
from entropy_lens.methods.loss import method_per_token_loss
from entropy_lens.model.forward import PackedBatch, response_logp_entropy

#: ``loss_fn(rows, logp, entropy) -> scalar``: the contribution of sequences ``rows`` (a slice of
#: the batch) to the batch loss, already normalised by the batch-level normaliser.
LossFn = Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor]

#: ``reduce(grads, loss, like) -> (grads, loss)``: the gradients (name -> tensor, None where a
#: parameter got none) and the loss of this process's sequences summed with every other process's;
#: ``like``: the tensors the gradients belong to (a missing one is zeros like them); see
#: :func:`entropy_lens.collectives.grad_sum`.
GradReduce = Callable[[dict[str, "torch.Tensor | None"], float, dict[str, torch.Tensor]],
                      "tuple[dict[str, torch.Tensor | None], float]"]


class NonFiniteUpdateError(ValueError, FloatingPointError):
    """The one-step update met a non-finite loss, gradient or parameter; the message (one line)
    names what and at which micro-batch. A ``ValueError`` (bad input: the CLI exits with 2) and,
    for older callers, a ``FloatingPointError``."""


#: What usually makes the update non-finite, appended to its error messages.
NON_FINITE_HINT = (
    "check the rollouts' reward and old_logp columns: extreme values overflow the ratio "
    "exp(logp - old_logp) or the advantages"
)


def trainable_params(model) -> dict[str, torch.nn.Parameter]:
    """Named trainable parameters (tied weights appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters."""
    return {n: p.detach().clone() for n, p in trainable_params(model).items()}


@torch.no_grad()
def restore(model, params: dict[str, torch.Tensor]) -> None:
    """Copy ``params`` back into the model's parameters in place."""
    for n, p in trainable_params(model).items():
        p.copy_(params[n])


def token_mean_loss(
    terms: MethodTerms,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> LossFn:
    """A method's loss (``methods.loss``), token-mean over the valid tokens of the batch,
    split so that micro-batch contributions sum to the batch loss:

        loss(rows) = (1 / L) · Σ_{b ∈ rows, t} ℓ_{b,t}      (ℓ: :func:`method_per_token_loss`)

    ``terms``, ``old_logp``, ``adv``, ``mask``: ``[B, T]`` rows of the sequences this loss covers;
    ``n_tokens``: the normaliser L (default ``mask.sum()``; a process that holds a share of the
    batch passes the whole batch's count); ``device``: where the per-token inputs are moved, once
    (default: where they are)."""
    n_tokens = float(max(int(mask.sum()), 1) if n_tokens is None else max(int(n_tokens), 1))
    if device is not None:
        terms = terms_to(terms, device)
        old_logp, adv, mask = old_logp.to(device), adv.to(device), mask.to(device)

    def fn(rows: slice, logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        T = logp.shape[1]
        sub = terms.rows(rows, T)
        per_tok = method_per_token_loss(sub, logp, old_logp[rows, :T], adv[rows, :T], mask[rows, :T], entropy)
        return per_tok.sum() / n_tokens

    return fn


def terms_to(terms: MethodTerms, device: torch.device | str) -> MethodTerms:
    """``terms`` with every per-token tensor (weight, touched, clip bounds, advantage override, the
    penalty's selection and reference log-probs) on ``device``; ``stats`` stay where they are."""
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    pen = terms.penalty
    if pen is not None:
        pen = replace(pen, select=move(pen.select), ref_logp=move(pen.ref_logp))
    return replace(terms, weight=move(terms.weight), touched=move(terms.touched), eps_low=move(terms.eps_low),
                   eps_high=move(terms.eps_high), adv=move(terms.adv), penalty=pen)


def grpo_token_mean_loss(
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = GRPO_EPS_LOW,
    eps_high: float = GRPO_EPS_HIGH,
    dual_clip: float | None = GRPO_DUAL_CLIP,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    n_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> LossFn:
    """GRPO clipped surrogate, token-mean over the valid tokens of the batch (defaults: the
    ``grpo`` method's ε 0.2/0.2, dual-clip 10, log-ratio clamp ±20); ``n_tokens`` and ``device``
    as in :func:`token_mean_loss`."""
    terms = MethodTerms(weight=torch.ones_like(old_logp), touched=torch.zeros_like(mask), eps_low=eps_low,
                        eps_high=eps_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp)
    return token_mean_loss(terms, old_logp, adv, mask, n_tokens, device)


def make_optimizer(params, optimizer: str, lr: float, weight_decay: float = 0.0):
    """``sgd`` (plain, no momentum) or ``adamw`` (β = (0.9, 0.999), ε = 1e-8)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be > 0 and finite, got {lr}")
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose sgd or adamw")


def one_step_update(
    model,
    packed: PackedBatch,
    loss_fn: LossFn,
    lr: float,
    optimizer: str = "sgd",
    temperature: float = 1.0,
    micro_batch: int = 4,
    weight_decay: float = 0.0,
    progress: Callable[[int], None] | None = None,
    reduce: GradReduce | None = None,
    first_row: int = 0,
    before: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Take one optimizer step on ``loss_fn`` (gradients accumulated over micro-batches).

    Returns ``(delta, loss)``: the real update θ' − θ per parameter name (on the model's device)
    and the batch loss. The model is left at θ' (use :func:`restore` to go back). Dropout is off
    (eval mode). ``packed`` must be on the model's device.

    Low precision (bf16/fp16 parameters): the gradient is computed in the model's dtype, but the
    optimizer steps an fp32 master copy, so ``delta`` is the fp32 update (a 1e-6 step would
    otherwise round away in bf16, whose spacing near 1 is 2^-7); the model is then set to θ'
    rounded to its dtype.

    Several processes: ``packed`` holds this process's sequences (``first_row``: the batch index of
    its first, for messages), ``loss_fn`` is normalised by the whole batch's token count, and
    ``reduce`` sums the accumulated gradients (fp32 for a low-precision model) and the loss over
    the processes before the step, ∇ = Σ_ranks ∇_r, so the optimizer (run by every process on the
    same sum) takes the single-process step.

    ``before``: a snapshot of θ (:func:`snapshot`) the caller already holds, used instead of a
    second copy (it is read, never written).

    Raises :class:`NonFiniteUpdateError` (a ValueError) when a micro-batch's loss or the
    accumulated gradient is non-finite (the parameters are then untouched), or when the step
    itself makes a parameter non-finite (the parameters are then restored to θ).
    """
    model.eval()
    params = trainable_params(model)
    before = before if before is not None else {n: p.detach().clone() for n, p in params.items()}
    master = fp32_master(params)
    opt = make_optimizer(list((master or params).values()), optimizer, lr, weight_decay)
    opt.zero_grad(set_to_none=True)
    try:
        total = _accumulate(model, packed, loss_fn, params, temperature, micro_batch, progress, first_row)
        grads = {}
        for n, p in params.items():  # a low-precision gradient is freed as soon as its fp32 copy exists
            grads[n] = p.grad.float() if master and p.grad is not None else p.grad
            if master:
                p.grad = None
        if reduce is not None:
            grads, total = reduce(grads, total, master or params)
            bad = first_non_finite(grads)
            if bad is not None:
                raise NonFiniteUpdateError(f"one-step update: non-finite gradient of {bad} after summing the "
                                           f"processes' gradients; {NON_FINITE_HINT}")
        for n, t in (master or params).items():
            t.grad = grads[n]
        del grads  # the gradients live on in .grad only, freed below
        _step(opt, model, before, lr)
    finally:
        opt.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad = None
    with torch.no_grad():
        if master:
            delta = {n: m.detach() - before[n].float() for n, m in master.items()}
            restore(model, {n: m.detach() for n, m in master.items()})
        else:
            delta = {n: p.detach() - before[n] for n, p in params.items()}
    bad = first_non_finite(delta)
    if bad is not None:
        restore(model, before)
        raise NonFiniteUpdateError(
            f"one-step update: the step made parameter {bad} non-finite (learning rate {lr:g} too large?)"
        )
    return delta, total


def _accumulate(model, packed: PackedBatch, loss_fn: LossFn, params: dict[str, torch.nn.Parameter],
                temperature: float, micro_batch: int, progress: Callable[[int], None] | None,
                first_row: int) -> float:
    """Backward of ``loss_fn`` micro-batch by micro-batch (gradients accumulate in ``params``);
    returns the summed loss. :class:`NonFiniteUpdateError` names the micro-batch whose loss or
    accumulated gradient is non-finite (``first_row``: batch index of ``packed``'s first sequence)."""
    total = 0.0
    B = packed.mask.shape[0]
    n_micro = -(-B // micro_batch)
    for k, i in enumerate(range(0, B, micro_batch)):
        rows = slice(i, min(i + micro_batch, B))
        where = f"micro-batch {k + 1} of {n_micro} (sequences {first_row + rows.start}-{first_row + rows.stop - 1})"
        logp, ent = response_logp_entropy(model, packed.select(rows), temperature)
        loss = loss_fn(rows, logp, ent)
        value = float(loss.detach())  # one scalar per micro-batch
        if not math.isfinite(value):
            raise NonFiniteUpdateError(f"one-step update: non-finite loss ({value}) in {where}; {NON_FINITE_HINT}")
        loss.backward()
        bad = first_non_finite_grad(params)
        if bad is not None:
            raise NonFiniteUpdateError(f"one-step update: non-finite gradient of {bad} after {where}; {NON_FINITE_HINT}")
        total += value
        if progress:
            progress(rows.stop - rows.start)
    return total


#: Parameter dtypes whose updates are taken on an fp32 master copy.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fp32_master(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """fp32 leaf copies of low-precision parameters (None when every parameter is fp32 or fp64)."""
    if not any(p.dtype in LOW_PRECISION for p in params.values()):
        return None
    return {n: p.detach().float().clone().requires_grad_(True) for n, p in params.items()}


def _step(opt, model, before: dict[str, torch.Tensor], lr: float) -> None:
    """``opt.step()``; an overflow inside the optimizer (a step size beyond the parameters'
    float range) restores ``before`` and raises :class:`NonFiniteUpdateError`."""
    try:
        opt.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        restore(model, before)
        raise NonFiniteUpdateError(
            f"one-step update: the optimizer step overflowed the parameters' float range (learning rate {lr:g} too large?)"
        ) from exc


def first_non_finite(tensors: dict[str, torch.Tensor | None]) -> str | None:
    """Name of the first tensor holding NaN or ±inf (None entries skipped), else None; one
    device-to-host transfer when all are finite."""
    names = [n for n, t in tensors.items() if t is not None]
    if not names:
        return None
    where = tensors[names[0]].device
    finite = torch.stack([torch.isfinite(tensors[n]).all().to(where) for n in names])
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0, 0])]


def first_non_finite_grad(params: dict[str, torch.nn.Parameter]) -> str | None:
    """Name of the first parameter whose (accumulated) gradient holds NaN or ±inf, else None."""
    return first_non_finite({n: p.grad for n, p in params.items()})

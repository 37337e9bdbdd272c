"""Functional learner calls, a differentiable Adam, and Adam's reverse-mode meta-gradient.

The bi-level distillers (TD3 and Farzi) train an inner learner on synthetic
data and differentiate an outer loss on real data through that training. This
module owns the pieces they share:

* :class:`FunctionalLearner` runs any :class:`~bench.learner.TextSASRec` method
  with parameters passed in as plain tensors (``torch.func.functional_call``),
  so one learner module serves every inner iterate.
* :func:`adam_step` is Adam written out of place, so autograd can
  differentiate through it. Under ``torch.no_grad`` it is ordinary Adam.
* :func:`unrolled_meta_gradient` differentiates through ``T`` inner Adam steps
  with plain autograd. Its memory grows linearly with ``T``.
* :func:`reverse_meta_gradient` computes the same gradient in reverse mode.
  It walks the inner steps backwards, recovers each earlier iterate from the
  later one by inverting Adam's update, and accumulates Hessian-vector
  products, so the autograd graph contains one inner step at a time. This is the
  reverse-mode Adam of "Farzi Data: Autoregressive Data Distillation"
  (Sachdeva et al., 2023), written from its description.

Adam update used throughout (step ``t`` counted from 1, bias corrections
``c1 = 1 - beta1**t`` and ``c2 = 1 - beta2**t``)::

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t**2
    theta_t = theta_{t-1} - lr * (m_t / c1) / (sqrt(v_t / c2 + eps_root) + eps)

``eps_root`` (default 1e-16) departs from ``torch.optim.Adam``, which has no
such term. The derivative of ``sqrt`` is infinite at 0, so without it a
parameter whose gradient is exactly zero would turn the meta-gradient into
NaN. The update then differs from ``torch.optim.Adam``'s by a relative amount
of at most ``eps_root / (2 * v_t / c2)``, below 1e-8 wherever
``v_t / c2 > 5e-9``. Where ``v_t`` is near 0 the denominator grows from
``eps`` to at most ``eps + 1e-8``.

Inner steps run with dropout disabled (the learner is put in eval mode): the
reverse pass recomputes each step's gradient and needs it to be a
deterministic function of the parameters and the batch.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.config import check_range
from bench.learner import TextSASRec

logger = logging.getLogger(__name__)

Params = tuple[torch.Tensor, ...]
InnerLoss = Callable[[Params, Sequence[torch.Tensor], int], torch.Tensor]
OuterLoss = Callable[[Params], torch.Tensor]


# Functional learner ---------------------------------------------------------


class _MethodCaller(nn.Module):
    """Module whose ``forward(fn, *args)`` returns ``fn(learner, *args)``.

    ``torch.func.functional_call`` only calls ``forward``, so this wrapper lets
    it call any learner method or loss function with substituted parameters.
    """

    def __init__(self, learner: TextSASRec) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, fn, *args):
        return fn(self.learner, *args)


class FunctionalLearner:
    """A :class:`TextSASRec` evaluated with parameters supplied on each call.

    The wrapped learner is put in eval mode (no dropout). Its buffers (the
    text vectors) are used as they are, and only parameters are substituted.

    Args:
        learner: the module whose architecture and buffers are used. Its own
            parameter values are ignored by :meth:`call`.
    """

    def __init__(self, learner: TextSASRec) -> None:
        self.learner = learner.eval()
        self._caller = _MethodCaller(learner)
        self.names: tuple[str, ...] = tuple(name for name, _ in learner.named_parameters())

    def parameters_from(self, state: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Return detached copies of the parameters, in :attr:`names` order.

        Args:
            state: a learner state dict (for example an expert checkpoint);
                None copies the wrapped learner's current parameters.

        Returns:
            One tensor per parameter, not requiring grad.

        Raises:
            KeyError: if ``state`` lacks one of the learner's parameters.
        """
        if state is None:
            own = dict(self.learner.named_parameters())
            return tuple(own[name].detach().clone() for name in self.names)
        return tuple(state[name].detach().clone().to(self._dtype()) for name in self.names)

    def _dtype(self) -> torch.dtype:
        return next(self.learner.parameters()).dtype

    def call(self, params: Sequence[torch.Tensor], fn: Callable, *args):
        """Return ``fn(learner, *args)`` computed with ``params`` as the learner's parameters.

        Args:
            params: tensors in :attr:`names` order.
            fn: a function of the learner and ``args``, e.g.
                ``lambda learner, seqs: learner.hard_loss(seqs)``.
            *args: further arguments of ``fn``.

        Returns:
            Whatever ``fn`` returns; it is differentiable with respect to
            ``params`` and to any tensor in ``args`` that requires grad.
        """
        mapping = {f"learner.{name}": value for name, value in zip(self.names, params)}
        # The fused CPU attention kernels have no second derivative, but the
        # math kernel has one, and the meta-gradients need it.
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.functional_call(self._caller, mapping, (fn, *args))


def parameter_bytes(params: Sequence[torch.Tensor]) -> int:
    """Return the bytes held by a tuple of tensors."""
    return sum(p.element_size() * p.nelement() for p in params)


# Differentiable Adam ----------------------------------------------------------


@dataclass(frozen=True)
class AdamSettings:
    """Hyperparameters of the functional Adam (see the module docstring).

    Attributes:
        lr: step size.
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        eps: added to the root of the second moment, as in ``torch.optim.Adam``.
        eps_root: added under the root, which keeps the derivative of the
            update finite where a gradient is exactly zero.
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 1e-16

    def __post_init__(self) -> None:
        where = "adam"
        check_range(where, "lr", self.lr, low=0.0, low_open=True)
        check_range(where, "beta1", self.beta1, low=0.0, low_open=True, high=0.999999)
        check_range(where, "beta2", self.beta2, low=0.0, low_open=True, high=0.999999)
        check_range(where, "eps", self.eps, low=0.0)
        check_range(where, "eps_root", self.eps_root, low=0.0, low_open=True)


@dataclass(frozen=True)
class AdamState:
    """Adam's step count and moment estimates, one tensor per parameter."""

    step: int
    exp_avg: Params
    exp_avg_sq: Params


def adam_init(params: Sequence[torch.Tensor]) -> AdamState:
    """Return the state of a fresh Adam (step 0, zero moments)."""
    zeros = tuple(torch.zeros_like(p) for p in params)
    return AdamState(0, zeros, tuple(torch.zeros_like(p) for p in params))


def _adam_denominator(exp_avg_sq: torch.Tensor, step: int, settings: AdamSettings):
    """Return ``(root, root + eps)`` with ``root = sqrt(v / c2 + eps_root)``."""
    root = torch.sqrt(exp_avg_sq / (1.0 - settings.beta2**step) + settings.eps_root)
    return root, root + settings.eps


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: AdamState,
    settings: AdamSettings,
) -> tuple[Params, AdamState]:
    """Apply one Adam update out of place.

    Every operation creates new tensors, so the result is differentiable with
    respect to ``params``, ``grads`` and the state when they carry a graph.

    Args:
        params: current parameters.
        grads: gradients of the loss at ``params``, same shapes.
        state: Adam state before the update.
        settings: Adam hyperparameters.

    Returns:
        The updated parameters and the new state.
    """
    step = state.step + 1
    beta1, beta2 = settings.beta1, settings.beta2
    new_params, new_avg, new_avg_sq = [], [], []
    for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq):
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        _, denominator = _adam_denominator(v, step, settings)
        new_params.append(p - settings.lr * (m / (1.0 - beta1**step)) / denominator)
        new_avg.append(m)
        new_avg_sq.append(v)
    return tuple(new_params), AdamState(step, tuple(new_avg), tuple(new_avg_sq))


def _gradient(loss: torch.Tensor, params: Params, create_graph: bool) -> Params:
    """Return the gradient of ``loss`` with respect to ``params``, with zeros for unused parameters."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))


def run_adam(
    inner_loss: InnerLoss,
    params: Sequence[torch.Tensor],
    synthetic: Sequence[torch.Tensor],
    state: AdamState,
    n_steps: int,
    settings: AdamSettings,
    *,
    differentiable: bool,
    compute_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Params, AdamState]:
    """Run ``n_steps`` Adam steps of ``inner_loss`` starting from ``params`` and ``state``.

    Args:
        inner_loss: ``inner_loss(params, synthetic, t)``, the loss of step
            ``t`` (the Adam step count after the update, from 1).
        params: starting parameters; the update runs in their dtype.
        synthetic: tensors the loss depends on besides the parameters.
        state: Adam state at the start, in the dtype of ``params``.
        n_steps: number of steps.
        settings: Adam hyperparameters.
        differentiable: True keeps the graph through every step (parameters
            become functions of ``synthetic`` and the inputs); False detaches
            each step, which is ordinary training.
        compute_dtype: dtype of the parameters passed to the loss (None: the dtype of ``params``).
            Parameters are cast for the loss and gradients cast back.
        on_step: called after each step with the step count and the loss.

    Returns:
        The parameters and Adam state after the last step.
    """
    params = tuple(params)
    for _ in range(n_steps):
        t = state.step + 1
        if differentiable:
            leaves = tuple(p if p.requires_grad else p.detach().requires_grad_() for p in params)
            current = _cast(leaves, compute_dtype)
            loss = inner_loss(current, synthetic, t)
            grads = _cast(_gradient(loss, current, create_graph=True), leaves[0].dtype)
            params, state = adam_step(leaves, grads, state, settings)
        else:
            current = tuple(p.detach().requires_grad_() for p in _cast(params, compute_dtype))
            detached = tuple(s.detach() for s in synthetic)
            with torch.enable_grad():
                loss = inner_loss(current, detached, t)
                grads = _gradient(loss, current, create_graph=False)
            with torch.no_grad():
                grads = _cast(grads, params[0].dtype)
                params, state = adam_step(tuple(p.detach() for p in params), grads, state, settings)
        if on_step is not None:
            on_step(t, float(loss.detach()))
    return params, state


def _cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None) -> Params:
    """Cast tensors to ``dtype`` differentiably. None or a matching dtype leaves them unchanged."""
    if dtype is None:
        return tuple(tensors)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


# Meta-gradients ---------------------------------------------------------------


@dataclass
class MetaGradient:
    """Result of differentiating an outer loss through inner Adam training.

    Attributes:
        grads: gradient of the outer loss with respect to each synthetic
            tensor (zeros where it has no influence).
        outer_loss: outer loss at the final inner parameters.
        inner_losses: inner loss of each step, in order.
        params: final inner parameters (detached, in the dtype of the input
            parameters).
        reconstruction_error: largest relative difference, over stored
            checkpoints, between a reconstructed iterate and the stored one:
            ``max|recovered - stored| / max|stored|`` over parameters and both
            moments. NaN when no checkpoint was compared. Only
            :func:`reverse_meta_gradient` sets it.
        checkpoint_bytes: bytes of the stored checkpoints.
    """

    grads: Params
    outer_loss: float
    inner_losses: list[float]
    params: Params
    reconstruction_error: float = math.nan
    checkpoint_bytes: int = 0


def unrolled_meta_gradient(
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    params: Sequence[torch.Tensor],
    synthetic: Sequence[torch.Tensor],
    n_steps: int,
    settings: AdamSettings,
    *,
    state_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> MetaGradient:
    """Differentiate ``outer_loss`` through ``n_steps`` Adam steps with plain autograd.

    The graph of every inner step is kept until the final backward pass, so
    memory grows linearly with ``n_steps``. It is the reference that
    :func:`reverse_meta_gradient` is tested against.

    Args:
        inner_loss: ``inner_loss(params, synthetic, t)`` for step ``t`` (from 1).
        outer_loss: ``outer_loss(params)`` at the final parameters.
        params: starting parameters (no gradient flows into them).
        synthetic: tensors that require grad; the gradient is taken for them.
        n_steps: inner Adam steps.
        settings: Adam hyperparameters.
        state_dtype: dtype of the Adam update and its state (None: that of
            ``params``); the losses always see the dtype of ``params``.
        on_step: called after each inner step with the step count and the loss.

    Returns:
        The meta-gradient and the losses.
    """
    losses: list[float] = []

    def record(t: int, loss: float) -> None:
        losses.append(loss)
        if on_step is not None:
            on_step(t, loss)

    compute_dtype = params[0].dtype
    start = tuple(p.detach() for p in _cast(params, state_dtype))
    final, _ = run_adam(
        inner_loss, start, synthetic, adam_init(start), n_steps, settings,
        differentiable=True, compute_dtype=compute_dtype, on_step=record,
    )
    final = _cast(final, compute_dtype)
    loss = outer_loss(final)
    grads = torch.autograd.grad(loss, tuple(synthetic), allow_unused=True)
    grads = tuple(torch.zeros_like(s) if g is None else g for s, g in zip(synthetic, grads))
    return MetaGradient(grads, float(loss.detach()), losses, tuple(p.detach() for p in final))


def reverse_meta_gradient(
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    params: Sequence[torch.Tensor],
    synthetic: Sequence[torch.Tensor],
    n_steps: int,
    settings: AdamSettings,
    *,
    checkpoint_every: int | None = 25,
    state_dtype: torch.dtype | None = torch.float64,
    on_step: Callable[[int, float], None] | None = None,
) -> MetaGradient:
    """Differentiate ``outer_loss`` through ``n_steps`` Adam steps in reverse mode.

    Forward pass: ordinary Adam steps without a graph. Backward pass, for
    ``t = T .. 1``, given ``theta_t, m_t, v_t``:

    1. Recover ``theta_{t-1} = theta_t + lr * mhat_t / (sqrt(vhat_t + eps_root) + eps)``.
    2. Recompute ``g_t``, the inner gradient at ``theta_{t-1}``, with a graph.
    3. Push the adjoints ``d_theta, d_m, d_v`` back through the update.
       ``d_m'`` and ``d_v'`` add the update's partial derivatives times
       ``d_theta`` to ``d_m`` and ``d_v``, and
       ``d_g = (1 - beta1) d_m' + 2 (1 - beta2) g_t d_v'``. One
       vector-Jacobian product of ``g_t`` with ``d_g`` gives both the
       Hessian-vector product added to ``d_theta`` and the mixed product
       added to the synthetic gradient. Then ``d_m = beta1 d_m'`` and
       ``d_v = beta2 d_v'``.
    4. Recover ``m_{t-1} = (m_t - (1 - beta1) g_t) / beta1`` and
       ``v_{t-1} = max(0, (v_t - (1 - beta2) g_t**2) / beta2)``.

    Drift guard, in two parts:

    * Precision: the update, its state and the adjoints are kept in
      ``state_dtype`` (float64 by default) while the losses run in the dtype of
      ``params``. Recovering ``theta_{t-1}`` in float64 gives back the same
      float32 parameters the forward pass used, so the recomputed gradient is
      the forward one. With float32 state the recovered gradients drift from
      the first step on: on a 30-item test problem the meta-gradient was off
      by 3.5% after 5 steps.
    * Checkpoints: step 4 divides by ``beta1`` at every step, and running
      the training dynamics backwards amplifies any error further, so a long
      reconstruction drifts away even in float64. On the 30-item test
      problem with float64 state, 100 steps between checkpoints kept the
      reconstruction error at 3e-11, while 150 steps put the meta-gradient
      off by 6.5%. The forward pass therefore stores a copy of
      ``(theta, m, v)`` after every ``checkpoint_every`` steps (default 25).
      When the backward walk reaches a stored step, the recovered iterate is
      compared with the stored one (the largest relative difference is
      returned as ``reconstruction_error``) and replaced by it. The starting
      parameters are never recovered: step 1 uses ``params`` itself.

    Memory: the graph of one inner step, plus
    ``floor((n_steps - 1) / checkpoint_every)`` checkpoints of three
    parameter-sized tensors in ``state_dtype``, plus the float64 state and
    adjoints (six parameter-sized tensors). At a fixed ``checkpoint_every``
    the checkpoints grow linearly with ``n_steps``, but by parameter size
    only, while the unrolled graph grows by every activation of every step.
    ``checkpoint_every=None`` stores nothing and memory is constant in
    ``n_steps``; the drift in ``m`` is then bounded only by the precision.

    Args:
        inner_loss: ``inner_loss(params, synthetic, t)`` for step ``t`` (from
            1). It must be deterministic: the backward pass calls it again for
            every step and must get the same batch and the same value.
        outer_loss: ``outer_loss(params)`` at the final parameters.
        params: starting parameters (no gradient flows into them).
        synthetic: tensors that require grad; the gradient is taken for them.
        n_steps: inner Adam steps.
        settings: Adam hyperparameters.
        checkpoint_every: steps between stored checkpoints, or None for none.
        state_dtype: dtype of the Adam update, its state and the adjoints
            (None: that of ``params``).
        on_step: called once per forward and once per backward step with the
            step count and the inner loss; cost meters hook in here.

    Returns:
        The meta-gradient, the losses, the final parameters, the largest
        reconstruction error and the checkpoint bytes.

    Raises:
        ValueError: if ``n_steps`` < 1 or ``checkpoint_every`` < 1.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
    synthetic = tuple(synthetic)
    compute_dtype = params[0].dtype
    start = tuple(p.detach() for p in params)
    losses: list[float] = []

    def record(t: int, loss: float) -> None:
        losses.append(loss)
        if on_step is not None:
            on_step(t, loss)

    # Forward pass: plain Adam, keeping only the periodic checkpoints.
    checkpoints: dict[int, tuple[Params, Params, Params]] = {}
    theta = _cast(start, state_dtype)
    state = adam_init(theta)
    for _ in range(n_steps):
        theta, state = run_adam(
            inner_loss, theta, synthetic, state, 1, settings,
            differentiable=False, compute_dtype=compute_dtype, on_step=record,
        )
        t = state.step
        if checkpoint_every is not None and t % checkpoint_every == 0 and t < n_steps:
            checkpoints[t] = (
                tuple(p.clone() for p in theta),
                tuple(m.clone() for m in state.exp_avg),
                tuple(v.clone() for v in state.exp_avg_sq),
            )
    checkpoint_bytes = sum(3 * parameter_bytes(saved[0]) for saved in checkpoints.values())

    # Outer gradient at the final parameters.
    final = tuple(p.detach().requires_grad_() for p in _cast(theta, compute_dtype))
    with torch.enable_grad():
        outer = outer_loss(final)
        d_theta = [g.to(theta[0].dtype) for g in _gradient(outer, final, create_graph=False)]
    d_avg = [torch.zeros_like(p) for p in theta]
    d_avg_sq = [torch.zeros_like(p) for p in theta]
    d_synthetic = [torch.zeros_like(s, dtype=theta[0].dtype) for s in synthetic]

    theta = [p.detach() for p in theta]
    exp_avg = [m.detach() for m in state.exp_avg]
    exp_avg_sq = [v.detach() for v in state.exp_avg_sq]
    beta1, beta2, lr = settings.beta1, settings.beta2, settings.lr
    worst_error = math.nan
    for t in range(n_steps, 0, -1):
        bias1 = 1.0 - beta1**t
        bias2 = 1.0 - beta2**t

        # 1. Recover theta_{t-1}, and fold d_theta into the moment adjoints.
        with torch.no_grad():
            previous = []
            for i in range(len(theta)):
                root, denominator = _adam_denominator(exp_avg_sq[i], t, settings)
                mhat = exp_avg[i] / bias1
                previous.append(theta[i] + lr * mhat / denominator)
                d_avg[i] = d_avg[i] - lr * d_theta[i] / (bias1 * denominator)
                d_avg_sq[i] = d_avg_sq[i] + lr * d_theta[i] * mhat / (2.0 * root * denominator**2 * bias2)
        if t == 1:
            previous = list(_cast(start, state_dtype))

        # 2. Recompute g_t at theta_{t-1} with a graph for the second-order products.
        current = tuple(p.detach().requires_grad_() for p in _cast(previous, compute_dtype))
        with torch.enable_grad():
            loss = inner_loss(current, synthetic, t)
            grads = _gradient(loss, current, create_graph=True)
            with torch.no_grad():
                d_grads = [
                    ((1.0 - beta1) * dm + 2.0 * (1.0 - beta2) * g.detach().to(dm.dtype) * dv).to(g.dtype)
                    for g, dm, dv in zip(grads, d_avg, d_avg_sq)
                ]
            products = torch.autograd.grad(
                grads, current + synthetic, grad_outputs=d_grads, allow_unused=True
            )
        if on_step is not None:
            on_step(t, float(loss.detach()))

        # 3. and 4. Accumulate the products and recover the moments of step t - 1.
        with torch.no_grad():
            for i, product in enumerate(products[: len(current)]):
                if product is not None:
                    d_theta[i] = d_theta[i] + product.to(d_theta[i].dtype)
            for i, product in enumerate(products[len(current):]):
                if product is not None:
                    d_synthetic[i] = d_synthetic[i] + product.to(d_synthetic[i].dtype)
            for i, g in enumerate(grads):
                g = g.detach().to(exp_avg[i].dtype)
                d_avg[i] = beta1 * d_avg[i]
                d_avg_sq[i] = beta2 * d_avg_sq[i]
                exp_avg[i] = (exp_avg[i] - (1.0 - beta1) * g) / beta1
                exp_avg_sq[i] = torch.clamp((exp_avg_sq[i] - (1.0 - beta2) * g * g) / beta2, min=0.0)
            theta = [p.detach() for p in previous]
        del grads, products, current, loss

        # Drift guard: swap in the stored checkpoint of step t - 1 if there is one.
        saved = checkpoints.pop(t - 1, None)
        if saved is not None:
            error = _relative_error((theta, exp_avg, exp_avg_sq), saved)
            worst_error = error if math.isnan(worst_error) else max(worst_error, error)
            theta, exp_avg, exp_avg_sq = list(saved[0]), list(saved[1]), list(saved[2])

    if not math.isnan(worst_error):
        logger.debug("reverse-mode Adam: largest relative reconstruction error %.3g", worst_error)
    grads = tuple(d.to(s.dtype) for d, s in zip(d_synthetic, synthetic))
    return MetaGradient(
        grads, float(outer.detach()), losses, tuple(p.detach() for p in final),
        reconstruction_error=worst_error, checkpoint_bytes=checkpoint_bytes,
    )


def _relative_error(recovered, stored) -> float:
    """Largest ``max|a - b| / max|b|`` over matching tensors of two state triples."""
    worst = 0.0
    for group_recovered, group_stored in zip(recovered, stored):
        for a, b in zip(group_recovered, group_stored):
            scale = float(b.abs().max()) if b.numel() else 0.0
            if scale > 0.0:
                worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


# Memory accounting ------------------------------------------------------------


class SavedTensorMeter:
    """Peak bytes of tensors that autograd keeps for backward, while active.

    A ``saved_tensors_hooks`` pack hook registers each saved tensor's storage.
    A storage counts from its first save until the last saved tensor object
    that refers to it is freed, and the peak is the largest total reached.
    Only the autograd graph is measured: tensors kept elsewhere (parameters,
    optimiser state, checkpoints) count only while a graph also keeps them.

    Use it as a context manager and read :attr:`peak_bytes` afterwards.
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._holders: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return tensor
        if key not in self._holders:
            self._holders[key] = 0
            self._sizes[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._holders[key] += 1
        weakref.finalize(tensor, self._release, key)
        return tensor

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.live_bytes -= self._sizes.pop(key)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# Helpers shared by the bi-level methods ---------------------------------------


class ExpertStarts:
    """Sampler of inner-learner starting points from the expert trajectory.

    Epochs are drawn uniformly from ``[low, high]`` after clipping both ends
    to the trajectory's length, so a configured range longer than a short
    expert run still works. The clipping is logged once.

    Args:
        trajectory: the expert trajectory (``epochs`` and ``state(epoch)``).
        low: first epoch of the configured range (1-based).
        high: last epoch of the configured range.
        generator: the generator of the draws.
        where: name used in the log line, e.g. the method's name.
        keep: state-dict keys to keep in memory (None: all). Passing the
            parameter names drops buffers such as the text vectors, which
            every checkpoint repeats.
    """

    def __init__(
        self, trajectory, low: int, high: int, generator: torch.Generator, where: str,
        keep: Sequence[str] | None = None,
    ) -> None:
        self.trajectory = trajectory
        self.low = min(low, trajectory.epochs)
        self.high = min(high, trajectory.epochs)
        if (self.low, self.high) != (low, high):
            logger.info(
                "%s: expert epochs %d-%d requested but the trajectory has %d epochs; using %d-%d",
                where, low, high, trajectory.epochs, self.low, self.high,
            )
        self.generator = generator
        self.keep = None if keep is None else set(keep)
        self._states: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def epochs(self) -> tuple[int, int]:
        """The epoch range actually drawn from, both ends included."""
        return self.low, self.high

    def draw(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Return a uniformly drawn epoch and its learner state dict (loaded once, then kept)."""
        epoch = int(torch.randint(self.low, self.high + 1, (1,), generator=self.generator))
        if epoch not in self._states:
            state = self.trajectory.state(epoch)
            if self.keep is not None:
                state = {key: value for key, value in state.items() if key in self.keep}
            self._states[epoch] = state
        return epoch, self._states[epoch]


class ProbeSelector:
    """Output selection by the validation probe, and the timing it needs.

    Keeps the candidate factors with the best validation NDCG@10 and a
    history of ``{"step", "elapsed_s", "ndcg@10"}`` entries, where
    ``elapsed_s`` is the wall time since the selector was created, probes
    included (their cost is the method's). Without a probe (the context has
    none, as in unit tests) it keeps the last candidate offered.

    Args:
        probe: the context's probe, or None.
        every: outer steps between probes. The last step is always probed.
        max_steps: training steps of each probe learner.
        n_users: validation users each probe scores.
    """

    def __init__(self, probe: Callable | None, every: int, max_steps: int, n_users: int) -> None:
        self.probe = probe
        self.every = every
        self.max_steps = max_steps
        self.n_users = n_users
        self.history: list[dict] = []
        self.best_step = 0
        self.best_score = -math.inf
        self.best_factors: dict[str, torch.Tensor] | None = None
        self.probe_s = 0.0
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        """Wall seconds since the selector was created."""
        return time.perf_counter() - self._start

    def offer(self, step: int, last_step: int, factors: Mapping[str, torch.Tensor], build: Callable):
        """Probe the candidate of ``step`` when one is due, and keep it if it is the best so far.

        Args:
            step: the outer step just finished (from 1).
            last_step: the final outer step, which is always probed.
            factors: the candidate's factors, cloned when kept.
            build: ``build(factors) -> SyntheticSet`` for the probe.

        Returns:
            The candidate's validation NDCG@10, or None when no probe ran.
        """
        if self.probe is None:
            if step == last_step:
                self.best_factors = {k: v.detach().clone() for k, v in factors.items()}
                self.best_step = step
            return None
        if step % self.every and step != last_step:
            return None
        started = time.perf_counter()
        score = float(self.probe(build(factors), max_steps=self.max_steps, n_users=self.n_users))
        self.probe_s += time.perf_counter() - started
        self.history.append({"step": step, "elapsed_s": round(self.elapsed_s(), 3), "ndcg@10": score})
        if score > self.best_score:
            self.best_score = score
            self.best_step = step
            self.best_factors = {k: v.detach().clone() for k, v in factors.items()}
        return score


def real_training_matrix(context, budget) -> tuple[torch.Tensor, int]:
    """Return the real training sequences cut to the learner's input length, and the synthetic length.

    Raises:
        BudgetError: if the budget requests more sequences than there are
            training sequences with at least two items.
    """
    real = torch.from_numpy(context.train_matrix())
    budget.check_against(len(real))
    max_len = context.cache.learner.max_len
    # Budget and LearnerConfig both guarantee lengths of at least 2.
    return real[:, -(max_len + 1):], min(budget.seq_len, max_len + 1)

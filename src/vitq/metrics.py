"""Search metrics: how far a quantized layer output ``Ô`` is from the float output ``O``.

Every metric has the signature ``metric(out_q, out_fp, grad=None, axis=None) -> Tensor`` and *lower is
better*: a scalar, or with ``axis`` one value per index of that dimension of the output (the mean over
the others; ``ptq4vit_search`` uses it to search every output channel's / head's scale on its own); searches (``ptq4vit_search``, quantizers' own ``search_params``) call it on outputs that
the quantizer's ``fake_quant`` produced - a metric never re-derives a quantizer.

* ``mse``     - ``mean((Ô - O)²)``.
* ``cosine``  - ``1 - mean_rows cos(Ô_row, O_row)`` along the last dim (PTQ4ViT's "BasePTQ" metric,
  ``F.cosine_similarity(..., dim=-1)``; hahnyuan/PTQ4ViT quant_layers/*.py ``_get_similarity``).
* ``hessian`` - PTQ4ViT's Hessian-guided metric (METHODS.md §5, [V-code] utils/quant_calib.py +
  ``metric == "brecq"`` in quant_layers/*.py): ``mean((g ⊙ (Ô - O))²)`` where ``g = ∂L/∂O`` is the
  gradient of ``L = KL(softmax(FP logits) ‖ softmax(model logits))`` (``F.kl_div(log_softmax(pred),
  softmax(raw_pred), reduction="batchmean")``) w.r.t. the layer output. PTQ4ViT *maximises*
  ``-E[(g (O - Ô))²]``; we minimise the same quantity. The diagonal ``g²`` is the Fisher / Gauss-Newton
  approximation of the Hessian of the task loss w.r.t. ``O``.

:func:`output_grads` computes ``g`` for any set of modules in one backward pass;
:func:`kl_to_reference` and :func:`sampled_nll` are the two losses it is used with (see the
``grad`` option of :mod:`vitq.passes.ptq4vit` for why there are two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import forward_logits
from .errors import ConfigError

Metric = Callable[..., Tensor]  # (out_q, out_fp, grad=None, axis=None)


def _mean(err: Tensor, axis: Optional[int]) -> Tensor:
    """The mean of ``err``, or with ``axis`` the mean over every other dim (one value per index)."""
    if axis is None:
        return err.mean()
    return err.movedim(axis, 0).reshape(err.shape[axis], -1).mean(1)


def mse(out_q: Tensor, out_fp: Tensor, grad: Optional[Tensor] = None, axis: Optional[int] = None) -> Tensor:
    """Mean squared error."""
    return _mean((out_q - out_fp).pow(2), axis)


def cosine(out_q: Tensor, out_fp: Tensor, grad: Optional[Tensor] = None, axis: Optional[int] = None) -> Tensor:
    """Cosine distance along the last dim, averaged over all other positions (``axis``: not the last dim,
    whose entries the cosine mixes)."""
    if axis is not None and axis % out_q.dim() == out_q.dim() - 1:
        raise ConfigError("the cosine metric compares whole rows of the last dim: it has no value per index of "
                          "that dim; use metric mse or hessian for a search per output channel")
    return 1.0 - _mean(F.cosine_similarity(out_q, out_fp, dim=-1), axis)


def hessian(out_q: Tensor, out_fp: Tensor, grad: Optional[Tensor] = None, axis: Optional[int] = None) -> Tensor:
    """PTQ4ViT Hessian-guided error ``mean((g ⊙ (Ô - O))²)``; ``grad`` is ``g`` (shape of ``O``)."""
    if grad is None:
        raise ConfigError("the hessian metric needs output gradients: run it through a search that "
                          "computes them (ptq4vit_search) or use metric mse / cosine")
    return _mean((grad * (out_q - out_fp)).pow(2), axis)


METRICS: dict[str, Metric] = {"mse": mse, "cosine": cosine, "hessian": hessian}
#: metrics that need ``grad``
GRADIENT_METRICS = frozenset({"hessian"})


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"unknown metric {name!r}: use one of {', '.join(sorted(METRICS))}") from None


# ---------------------------------------------------------------------------------------------
# losses whose gradient weights the hessian metric
# ---------------------------------------------------------------------------------------------
def kl_to_reference(logits: Tensor, ref_probs: Tensor) -> Tensor:
    """``KL(ref ‖ softmax(logits))``, mean over the batch (PTQ4ViT's calibration loss)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), ref_probs, reduction="batchmean")


def sampled_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy against labels *sampled* from the float prediction, summed / batch size.

    ``E_y[(∂ -log q(y) / ∂O)²]`` with ``y ~ p_fp`` is the diagonal of the Fisher information, i.e. of
    the Hessian of ``KL(p_fp ‖ q)`` at ``q = p_fp`` - where the gradient of the KL itself is zero.
    """
    return F.cross_entropy(logits, labels, reduction="sum") / logits.shape[0]


def output_grads(model: nn.Module, x: Tensor, modules: Sequence[nn.Module],
                 loss_fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``∂ loss_fn(model(x)) / ∂ (output of m)`` for every ``m`` in ``modules`` (one backward pass).

    Each module must run exactly once per forward (true for every quantizable layer of the
    supported models). Gradients come back detached, with the shape of the module's output.
    """
    outs: list[Optional[Tensor]] = [None] * len(modules)

    def hook(i: int):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, _args: object, out: Tensor) -> None:
            if outs[i] is not None:
                raise ConfigError(f"module {type(_m).__name__} ran twice in one forward: "
                                  "output gradients need each layer to run once")
            outs[i] = out
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # the graph must exist even if no weight needs grad
            loss = loss_fn(forward_logits(model, xg))
            missing = [type(modules[i]).__name__ for i, o in enumerate(outs) if o is None]
            if missing:
                raise ConfigError(f"{len(missing)} module(s) ({missing[0]}, ...) did not run in the forward pass")
            grads = torch.autograd.grad(loss, [o for o in outs if o is not None], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.zeros_like(o) if g is None else g.detach()  # type: ignore[arg-type]
            for g, o in zip(grads, outs, strict=True)]


__all__ = ["GRADIENT_METRICS", "METRICS", "Metric", "cosine", "get_metric", "hessian", "kl_to_reference", "mse",
           "output_grads", "sampled_nll"]

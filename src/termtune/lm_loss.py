"""The training loss of a language model without materialising its full logits ("cut" cross-entropy).

The lm_head (vocab x d_model, e.g. 32128 x 512) and the softmax over its output
are most of the work per target token. The standard forward writes a batch x target_len x vocab
fp32 logits tensor (~130 MB for 4 x 256 tokens), reads it back for the softmax, and writes its
gradient: memory-bound passes that miss the cache on a CPU. Here the model runs without its
lm_head, the padding positions are dropped, and the logits are made a few rows at a time, each
chunk's gradient with respect to the hidden states computed right away (the lm_head is frozen
under LoRA, so that is the only gradient it needs). Same loss value as the standard path: the
mean cross-entropy over the non-pad (labels != -100) target tokens.

Imports torch at the top (an autograd Function is a class): import this module inside functions.
"""

from __future__ import annotations

from typing import Any

import torch

from termtune.families import family_of, family_of_model

IGNORE = -100


def supports_chunked_loss(model: Any) -> bool:
    """True for a (PEFT-wrapped) model whose lm_head is a plain, frozen nn.Linear and whose family can line its
    outputs up with the labels (Family.takes_chunked_loss).

    Anything else (a quantized or LoRA-wrapped head, a trainable head, a bias, hooks) keeps the
    standard path: this is an optimisation, never a change of behaviour.
    """
    base = _base_model(model)
    head = getattr(base, "lm_head", None)
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and head.weight.is_floating_point() and not head._forward_hooks and not head._forward_pre_hooks
            and (family := family_of(base.config.to_dict())) is not None and family.takes_chunked_loss(base))


def chunked_lm_loss(model: Any, labels: torch.Tensor, chunk_size: int, **inputs: Any) -> dict[str, Any]:
    """{'loss': mean cross-entropy over the non-pad target tokens}, as `model(**inputs, labels=labels).loss`.

    `model` may be wrapped (DDP, PEFT): it is called as a whole, so the wrappers' forward logic runs.
    """
    base = _base_model(model)
    labels = family_of_model(base).chunked_loss_inputs(base, labels, inputs)
    # the token count of the whole accumulated batch, where the family's own loss divides by it (decoders)
    num_items = inputs.pop("num_items_in_batch", None)
    head = base.lm_head
    base.lm_head = torch.nn.Identity()  # the model's "logits" are then its (scaled) last hidden states
    try:
        hidden = model(**inputs, use_cache=False).logits
    finally:
        base.lm_head = head
    keep = labels != IGNORE
    total = LinearCrossEntropy.apply(hidden[keep], head.weight, labels[keep], chunk_size)
    return {"loss": total / (keep.sum() if num_items is None else num_items)}


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), chunk by chunk; gradient for hidden only.

    The gradient is computed in the forward pass, while each chunk's logits are at hand: the
    backward pass then only scales it. One buffer, reused for every chunk, holds a chunk's logits
    and then, in place, its log-probabilities and their gradient (a fresh 100 MB tensor costs page
    faults on a CPU). Under autocast the matmuls run in the autocast dtype and the softmax in fp32
    (in a second buffer), as the standard path does.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w, h_all = weight.to(dtype), hidden.to(dtype)
        rows_max = min(chunk_size, hidden.shape[0])
        logits_buf = hidden.new_empty((rows_max, weight.shape[0]), dtype=dtype)
        logp_buf = logits_buf if dtype == torch.float32 else torch.empty_like(logits_buf, dtype=torch.float32)
        grad = h_all.new_empty(h_all.shape) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                y = targets[start:start + chunk_size]
                rows = torch.arange(len(y), device=y.device)
                logits, logp = logits_buf[:len(y)], logp_buf[:len(y)]
                torch.mm(h_all[start:start + chunk_size], w.t(), out=logits)
                torch.log_softmax(logits, -1, dtype=torch.float32, out=logp)
                total -= logp[rows, y].sum()
                if grad is not None:  # d loss / d logits = softmax - one_hot, then back through the matmul
                    logp.exp_()
                    logp[rows, y] -= 1
                    torch.mm(logp.to(dtype), w, out=grad[start:start + chunk_size])
        ctx.save_for_backward(None if grad is None else grad.to(hidden.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _base_model(model: Any) -> Any:
    """The transformers model inside DDP / PEFT wrappers."""
    while hasattr(model, "module"):  # DDP, DataParallel
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model

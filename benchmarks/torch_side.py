"""torch / transformers side of the benchmarks: what a user would pick instead.

Only benchmark worker processes import this module (the `ref` extra); the
library never does. The model is transformers' ``Qwen3ForCausalLM`` loaded
from the directory the JAX side wrote, float32, SDPA attention (transformers'
default), torch's default thread count.
"""
from __future__ import annotations

import torch
import transformers

from benchmarks.harness import OPTIMIZER


def load_model(directory: str, *, train: bool) -> transformers.Qwen3ForCausalLM:
    """The shared weights as a transformers model (train or eval mode, no EOS stop)."""
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="sdpa")
    model.train(train)
    # Benchmarks generate exactly max_new_tokens: no stop token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the JAX side's hyper-parameters (benchmarks.harness.OPTIMIZER)."""
    o = OPTIMIZER
    return torch.optim.AdamW(model.parameters(), lr=o["learning_rate"], betas=(o["b1"], o["b2"]),
                             eps=o["eps"], weight_decay=o["weight_decay"])


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss: torch.Tensor) -> None:
    """backward, global-norm clip (as OPTIMIZER['grad_clip']), AdamW step, zero grads."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ref_logp: torch.Tensor, *, eps_low: float, eps_high: float,
                dual_clip: float | None, kl_coef: float, control_weight: float) -> torch.Tensor:
    """The token-mean CHRPO loss of chrpo.policy_loss (k3 KL, first token weighted), in torch.

    rho = exp(logp - old); l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A),
    dual clip min(l, -c A) where A < 0; + kl_coef * k3(logp, ref); the first
    response token's loss times control_weight; mean over mask. logp... [B, C], A [B].
    """
    adv = advantages[:, None].expand_as(logp)
    rho = torch.exp(logp - old_logp)
    loss = -torch.minimum(rho * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    u = ref_logp - logp
    loss = loss + kl_coef * (torch.expm1(u) - u)
    first = mask & (torch.cumsum(mask.int(), dim=1) == 1)
    loss = torch.where(first, control_weight * loss, loss)
    maskf = mask.float()
    return (loss * maskf).sum() / maskf.sum()

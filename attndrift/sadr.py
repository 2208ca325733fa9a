"""SADR: Selective Attention Drift Restriction (SPEC §4).

During the value (ROME v*) or residual (MEMIT z) optimisation, attention heads that start to
over-focus on the edited subject are pulled back towards their vanilla attention:

* Reference: the vanilla attention rows of the templated rewriting prompts, recorded once with
  δ = 0 (detached).
* Selection (recomputed every step, no gradient): in layer l and prompt j, head h is
  restrained when its current attention from the last prompt token t_j to the subject-last
  token s_j exceeds the largest vanilla attention any head of layer l gives that pair:
  ``P*[l,h,j][t_j, s_j] > max_h' P[l,h',j][t_j, s_j]``.
* Loss: for every restrained head, ``KL(P[t_j, :] ‖ P*[t_j, :])`` over all keys (vanilla
  first); summed over restrained heads, averaged over prompts, summed over layers.
* Ablation: ``all_heads=True`` restrains every head (no selection).

Only layers after the edited one can drift (δ enters at layer L's MLP output or residual), so
callers pass the attention rows of layers > L; earlier layers would contribute exactly 0.

Axis names: ``prompt layer head_index key_pos`` (the query row t_j is already selected).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: probabilities below this are treated as this in log(q) (never NaN, never inf)
EPS = 1e-12


@dataclass(frozen=True)
class SadrConfig:
    """SADR settings. The paper used γ = 0.01 for ROME (with 80 steps) and 0.005 for MEMIT
    on GPT-J."""

    gamma: float = 0.01
    all_heads: bool = False

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"SADR gamma must be >= 0, got {self.gamma}")


def kl_rows(
    p: Float[Tensor, "*rows key_pos"], q: Float[Tensor, "*rows key_pos"]
) -> Float[Tensor, "*rows"]:
    """KL(p ‖ q) = Σ_k p log(p / q) per row; 0·log 0 = 0; q clamped at EPS."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(EPS))).sum(-1)


def head_mask(
    vanilla: Float[Tensor, "prompt layer head_index key_pos"],
    current: Float[Tensor, "prompt layer head_index key_pos"],
    subject: Int[Tensor, " prompt"],
) -> Bool[Tensor, "prompt layer head_index"]:
    """Heads whose current attention to the subject beats every vanilla head of the layer."""
    idx = subject[:, None, None, None].expand(*current.shape[:3], 1)
    now = current.detach().gather(-1, idx)[..., 0]  # [prompt, layer, head]
    before = vanilla.gather(-1, idx)[..., 0].amax(-1, keepdim=True)  # [prompt, layer, 1]
    return now > before


def sadr_loss(
    vanilla: Float[Tensor, "prompt layer head_index key_pos"],
    current: Float[Tensor, "prompt layer head_index key_pos"],
    subject: Int[Tensor, " prompt"],
    all_heads: bool = False,
) -> tuple[Float[Tensor, ""], Float[Tensor, " layer"]]:
    """L_SADR and the mean number of restrained heads per layer (over prompts).

    Returns:
        (loss, heads): ``loss = Σ_l mean_j Σ_{h restrained} KL(vanilla ‖ current)``;
        ``heads[l]`` = restrained heads in layer l, averaged over prompts.
    """
    kl = kl_rows(vanilla, current)  # [prompt, layer, head]
    if all_heads:
        mask = torch.ones_like(kl, dtype=torch.bool)
    else:
        mask = head_mask(vanilla, current, subject)
    loss = (kl * mask).sum(-1).mean(0).sum()
    return loss, mask.float().sum(-1).mean(0)

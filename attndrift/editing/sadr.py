"""SADR: Selective Attention Drift Restriction (docs/METHOD.md, "SADR"), and its variants.

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

:class:`SadrConfig` also names the variants this toolkit adds (each off by default, so the
default is the paper's SADR):

* ``queries="after_subject"``: restrain the rows of every query after the subject's last token,
  not only t_j (each prompt's rows averaged, then prompts averaged);
* ``keys="subject"``: select on the attention *mass* over all subject tokens, not only s_j;
* ``threshold="own"``: a head is restrained when its attention to the subject exceeds its own
  vanilla attention (instead of the layer's largest);
* ``relation_prompts=True``: also restrain the attention on generic relation prompts of the
  subject (:data:`RELATION_TEMPLATES`), which carry no NLL term;
* ``prompts="distractors"`` (or ``"both"``): restrain the attention of *distractor* prompts —
  the sentence stating the edit followed by a query about another subject of the same relation
  (:mod:`attndrift.distractors`) — instead of (or besides) the rewriting prompts. On a
  rewriting prompt the last token must read the subject to answer o_new; on a distractor it
  never should.

Only layers after the edited one can drift (δ enters at layer L's MLP output or residual), so
callers pass the attention rows of layers > L; earlier layers would contribute exactly 0.

Axis names: ``prompt layer head_index query key_pos`` (the restrained query rows, already
selected).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import checks, metrics
from attndrift.editing import registry

#: probabilities below this are treated as this in log(q) (never NaN, never inf)
EPS = 1e-12
#: generic relation prompts of a subject, restrained with ``relation_prompts=True``: prompts
#: whose answer is some other fact about the subject (none of the evaluation's own prompts)
RELATION_TEMPLATES = (
    "{} is known for",
    "{} is associated with",
    "The most important thing about {} is",
    "People who know {} say that it is",
)


#: SADR's options: query rows restrained, what selection measures, the selection threshold,
#: whose attention is restrained (see the module docstring)
Queries = Literal["last", "after_subject"]
Keys = Literal["subject_last", "subject"]
Threshold = Literal["layer_max", "own"]
Prompts = Literal["rewrite", "distractors", "both"]


@dataclass(frozen=True)
class SadrConfig:
    """SADR settings. ``gamma`` has no default: a model's chosen value is its preset
    (:func:`preset`, e.g. ``sadr.preset(model)``); the other fields' defaults are the paper's
    SADR."""

    gamma: float  # weight of L_SADR in the value loss
    all_heads: bool = False  # ablation: restrain every head (no selection)
    # the options are Queries, Keys, Threshold, Prompts (typed str: checks.option says why)
    queries: str = "last"  # "last" (t_j) or "after_subject" (every query after s_j)
    keys: str = "subject_last"  # what selection measures: "subject_last" (s_j) or "subject"
    threshold: str = "layer_max"  # "layer_max" (the paper) or "own" (the head's vanilla value)
    relation_prompts: bool = False  # also restrain generic relation prompts of the subject
    prompts: str = "rewrite"  # whose attention: "rewrite" (the paper), "distractors", "both"

    def __post_init__(self) -> None:
        checks.number("SADR gamma", self.gamma, low=0)
        checks.option("SADR queries", self.queries, Queries)
        checks.option("SADR keys", self.keys, Keys)
        checks.option("SADR threshold", self.threshold, Threshold)
        checks.option("SADR prompts", self.prompts, Prompts)

    @property
    def variant(self) -> str:
        """Short name of the non-default choices (``""`` for the paper's SADR)."""
        parts = []
        if self.queries != "last":
            parts.append(f"queries={self.queries}")
        if self.keys != "subject_last":
            parts.append(f"keys={self.keys}")
        if self.threshold != "layer_max":
            parts.append(f"threshold={self.threshold}")
        if self.relation_prompts:
            parts.append("relation_prompts")
        if self.prompts != "rewrite":
            parts.append(f"prompts={self.prompts}")
        return ",".join(parts)


#: γ of ROME+SADR on SmolLM2-135M: the value the study docs/studies/sadr.md chose by its rule
#: (ES ≥ 99 %, PS within 3 points of the same-budget baseline, then the best harmonic mean of
#: RS and DNS), with ROME's SADR budget of 80 steps (``rome.PRESETS``' ``sadr_steps``). The one
#: place this number is written: the demo, the README and the notebooks read it from here.
SMOLLM2_ROME_GAMMA = 0.05

#: SADR per editor and model (the keys of :data:`attndrift.editing.rome.PRESETS`): GPT-J's are the
#: paper's (ROME 0.01, MEMIT 0.005); SmolLM2's ROME γ is :data:`SMOLLM2_ROME_GAMMA`, its MEMIT γ
#: half of it (the paper's MEMIT-to-ROME ratio, as the SmolLM2 MEMIT studies ran it), its PMET
#: γ the one the PMET ± SADR study fixed before its runs.
PRESETS: dict[str, dict[str, SadrConfig]] = {
    "rome": {
        "gpt-j": SadrConfig(gamma=0.01),
        "smollm2-135m": SadrConfig(gamma=SMOLLM2_ROME_GAMMA),
    },
    "memit": {
        "gpt-j": SadrConfig(gamma=0.005),
        "smollm2-135m": SadrConfig(gamma=SMOLLM2_ROME_GAMMA / 2),
    },
    "pmet": {"smollm2-135m": SadrConfig(gamma=0.4)},
}


def preset(model: HookedTransformer | str, editor: str = "rome") -> SadrConfig:
    """The SADR setting chosen for ``editor`` on a model (by name), e.g.
    ``sadr.preset(model).gamma``; a ValueError naming the presets there are otherwise.

    Pair it with the editor's preset (``rome.preset(model)``), whose ``sadr_steps`` is the step
    budget the γ was chosen under.
    """
    checks.choice("editor", editor, tuple(PRESETS))
    return registry.preset_for(PRESETS[editor], model, f"{editor.upper()}+SADR")


def watched_layers(model: HookedTransformer, layers: Sequence[int]) -> range:
    """The layers whose attention SADR watches for an edit of ``layers`` (an edit's
    ``layers``): every layer after the last edited one, the order of ``StepLog.heads``."""
    return range(max(layers) + 1, model.cfg.n_layers)


def attention_to_subject(
    rows: Float[Tensor, "prompt layer head_index query key_pos"],
    subject: Bool[Tensor, "prompt key_pos"],
) -> Float[Tensor, "prompt layer head_index query"]:
    """Attention of each row to the subject keys (the s_j key alone, or every subject token)."""
    return (rows * subject[:, None, None, None, :].to(rows.dtype)).sum(-1)


def head_mask(
    vanilla: Float[Tensor, "prompt layer head_index query key_pos"],
    current: Float[Tensor, "prompt layer head_index query key_pos"],
    subject: Bool[Tensor, "prompt key_pos"],
    threshold: str = "layer_max",
) -> Bool[Tensor, "prompt layer head_index query"]:
    """Heads whose current attention to the subject beats the threshold (no gradient):
    every vanilla head of the layer (``"layer_max"``) or the head's own vanilla value."""
    now = attention_to_subject(current.detach(), subject)  # [prompt, layer, head, query]
    before = attention_to_subject(vanilla, subject)
    if threshold == "layer_max":
        before = before.amax(2, keepdim=True)  # [prompt, layer, 1, query]
    return now > before


def sadr_loss(
    vanilla: Float[Tensor, "prompt layer head_index query key_pos"],
    current: Float[Tensor, "prompt layer head_index query key_pos"],
    subject: Bool[Tensor, "prompt key_pos"],
    query_weight: Float[Tensor, "prompt query"],
    cfg: SadrConfig,
) -> tuple[Float[Tensor, ""], Float[Tensor, " layer"]]:
    """L_SADR and the mean number of restrained heads per layer.

    Args:
        vanilla, current: attention rows at δ = 0 and now.
        subject: the keys selection measures (s_j alone, or every subject token).
        query_weight: each query row's weight within its prompt (rows of a prompt sum to 1;
            0 on padding rows).
        cfg: all heads or selection, and the selection threshold.

    Returns:
        (loss, heads): ``loss = Σ_l mean_j Σ_q w_jq Σ_{h restrained} KL(vanilla ‖ current)``;
        ``heads[l]`` = restrained heads in layer l, averaged the same way.
    """
    kl = metrics.kl(vanilla, current, floor=EPS)  # [prompt, layer, head, query]
    if cfg.all_heads:
        mask = torch.ones_like(kl, dtype=torch.bool)
    else:
        mask = head_mask(vanilla, current, subject, cfg.threshold)
    w = query_weight[:, None, :]  # [prompt, 1, query]
    loss = ((kl * mask).sum(2) * w).sum(-1).mean(0).sum()
    heads = (mask.float().sum(2) * w).sum(-1).mean(0)
    return loss, heads

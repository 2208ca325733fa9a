"""A lean forward of the blocks after an edited layer, over a frozen prefix key-value cache.

The value optimisation (:class:`attndrift.editing.value.ValueObjective`) runs the same few positions
per row (the subject's last token onwards) through the blocks after layer L at every step,
attending to a prefix that never changes. TransformerLens' forward does that through hook
points, einops rearrangements, a causal mask built per layer and the cached prefix keys
rotated again at every layer of every step. :class:`SuffixForward` computes the same numbers
from the model's weights directly:

* the prefix keys (rotated) and values are laid out once, per layer, as the attention reads
  them;
* rotary angles, the causal and padding mask, and the weight views are prepared once;
* grouped-query attention multiplies each key-value head with its group of query heads, the
  keys and values are never repeated;
* no hook point runs; the attention pattern rows SADR reads are picked from the explicit
  softmax of the layers asked for;
* the last block runs its MLP (and its queries) only at the positions whose hidden state is
  read.

It covers the block layouts of GPT-2, GPT-J, Llama and SmolLM2 (LayerNorm or RMS norm,
learned or rotary positions, sequential or parallel attention and MLP, plain or gated MLP,
grouped-query attention). :func:`unsupported` names what a model has beyond that (or forward
hooks on it, which only TransformerLens' forward would run); callers then keep TransformerLens'
forward. The numbers agree with it to float rounding (tested on the tiny models of every
architecture and on SmolLM2).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import (
    MLP,
    Attention,
    GatedMLP,
    GroupedQueryAttention,
    LayerNorm,
    RMSNorm,
)

#: config fields whose non-default values change the block computation beyond what
#: :class:`SuffixForward` implements (field: the value it implements)
_PLAIN_CONFIG = {
    "n_devices": 1,
    "attn_only": False,
    "use_attn_result": False,
    "use_split_qkv_input": False,
    "use_attn_in": False,
    "use_normalization_before_and_after": False,
    "use_qk_norm": False,
    "clip_qkv": None,
    "use_attention_sinks": False,
    "use_logn_attn": False,
    "use_dynamic_ntk_rope": False,
    "ungroup_grouped_query_attention": False,
    "load_in_4bit": False,
    "num_experts": None,
    "attention_dir": "causal",
}


def unsupported(model: HookedTransformer) -> str | None:
    """Why :class:`SuffixForward` cannot run ``model`` (None: it can)."""
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    for name, plain in _PLAIN_CONFIG.items():
        if getattr(cfg, name, plain) != plain:
            return f"config {name}={getattr(cfg, name)!r}"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional embedding {cfg.positional_embedding_type!r}"
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"post-norm architecture {cfg.original_architecture}"
    if softcap_enabled(cfg.attn_scores_soft_cap):
        return "attention score soft-cap"
    if cfg.is_layer_norm_activation():
        return f"layer-norm activation {cfg.act_fn!r}"
    if cfg.normalization_type is not None and type(model.ln_final) not in (LayerNorm, RMSNorm):
        return f"final norm {type(model.ln_final).__name__}"
    for i, block in enumerate(model.blocks):
        if type(block.attn) not in (Attention, GroupedQueryAttention):
            return f"block {i}: attention {type(block.attn).__name__}"
        if block.attn.attn_type != "global":
            return f"block {i}: {block.attn.attn_type} attention"
        if type(block.mlp) not in (MLP, GatedMLP):
            return f"block {i}: MLP {type(block.mlp).__name__}"
        for norm in (block.ln1, block.ln2):
            if type(norm) not in (LayerNorm, RMSNorm):
                return f"block {i}: norm {type(norm).__name__}"
    if has_hooks(model):
        return "forward hooks on the model"
    return None


def has_hooks(model: HookedTransformer) -> bool:
    """Whether any hook point of ``model`` holds a forward hook (only TransformerLens' forward
    would run it)."""
    return any(point.fwd_hooks for point in model.hook_dict.values())


def _norm(module, x: Tensor) -> Tensor:
    """TransformerLens' LayerNorm / RMSNorm: :func:`_normalised`, then its scale and shift."""
    x = _normalised(module, x) * module.w
    return x + module.b if isinstance(module, LayerNorm) else x


def _normalised(module, x: Tensor) -> Tensor:
    """The norm without its scale and shift, as one fused operation (half precision is
    normalised in float32, as TransformerLens does); :func:`_fold` moves the scale and shift
    into the product that follows the norm."""
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    shape = (x.shape[-1],)
    if isinstance(module, LayerNorm):
        return F.layer_norm(x, shape, eps=module.eps).to(dtype)
    return F.rms_norm(x, shape, eps=module.eps).to(dtype)


def _fold(norm, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(W diag(w), b + W β)``: a product of the normalised ``x̂`` with these equals the
    product of ``norm(x) = x̂ w + β`` with ``(W, b)`` (``weight`` in F.linear layout,
    ``[out, d_model]``); one elementwise pass fewer per norm, forward and backward."""
    folded = (weight * norm.w.detach()[None, :]).contiguous()
    if isinstance(norm, LayerNorm):
        shift = weight @ norm.b.detach()
        bias = shift if bias is None else bias + shift
    return folded, None if bias is None else _bias(bias)


@dataclass(frozen=True)
class _Layer:
    """One block's weights as the lean forward multiplies them, and its cached prefix."""

    w_qkv: Tensor  # [(n_heads + 2 n_kv) d_head, d_model] (F.linear layout)
    b_qkv: Tensor | None  # None: all zero (adding it would change nothing)
    w_o: Tensor  # [d_model, n_heads d_head]
    b_o: Tensor | None
    w_in: Tensor  # [d_mlp, d_model], or [2 d_mlp, d_model] (gated: W_gate rows, then W_in's)
    b_in: Tensor | None  # the MLP's b_in and the folded norm's shift (LayerNorm) through w_in
    b_act: Tensor | None  # a gated MLP's b_in, added after the gate's product (as
    # TransformerLens does); b_in then holds the folded shift only
    gated: bool
    w_out: Tensor  # [d_model, d_mlp]
    b_out: Tensor | None
    keys: Tensor  # [batch, n_kv, prefix, d_head]: the cached prefix, rotated
    values: Tensor  # [batch, n_kv, prefix, d_head]


def _mlp_in(mlp) -> Tensor:
    """The MLP's input weights in F.linear layout; a gated MLP's gate and input weights
    stacked, so that one product computes both (the same sums, one larger product)."""
    if isinstance(mlp, GatedMLP):
        return torch.cat([mlp.W_gate.detach().T, mlp.W_in.detach().T])
    return mlp.W_in.detach().T


def _bias(b: Tensor) -> Tensor | None:
    """``b`` (detached), or None when it is all zero: adding it is then exactly nothing."""
    return b.detach() if bool(b.detach().any()) else None


class SuffixForward:
    """Final hidden states of positions that continue a frozen prefix, from block ``start`` on.

    Args:
        model: the model (its weights are read, not copied, except the Q, K, V projections,
            laid out as one matrix per block; the model must not change while this is used).
        cache: a frozen :func:`~attndrift.models.prefix_cache` of the rows' prefixes
            (left-padded to ``prefix`` columns).
        attention_mask: ``[batch, prefix + pos]``, 1 on real tokens (the prefix's and the
            continuation's).
        start: the first block to run.
        read: ``[batch, pos]`` bool, the positions whose final hidden state is used (the last
            block runs its MLP only there; the other positions of the result are NaN, so that
            reading one shows at once). None: every position.

    Calling it with the residual entering block ``start`` (``[batch, pos, d_model]``) returns
    the final hidden states (after the final norm) and, if asked, the attention pattern rows
    of chosen query positions of chosen rows, for every block run.
    """

    def __init__(
        self,
        model: HookedTransformer,
        cache,
        attention_mask: Int[Tensor, "batch key_pos"],
        start: int,
        read: Tensor | None = None,
    ):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not cover {model.cfg.model_name}: {reason}")
        cfg = self.cfg = model.cfg
        self.model, self.start = model, start
        self.blocks = list(model.blocks)[start:]
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.group = self.n_heads // self.n_kv
        mask = attention_mask.bool()
        n_keys = mask.shape[1]
        self.prefix = prefix = cache.entries[0].past_keys.shape[1]
        self.n_pos = n_pos = n_keys - prefix
        # key k is visible from query i (column prefix + i) iff k <= prefix + i and k is real
        cols = torch.arange(n_keys, device=mask.device)
        causal = cols[None, :] <= prefix + torch.arange(n_pos, device=mask.device)[:, None]
        visible = causal[None] & mask[:, None, :]  # [batch, pos, key]
        dtype = cfg.dtype
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        # [batch, 1 (kv head), 1 (group), pos, key]: added to the scores
        self.bias = torch.where(visible, zero, float("-inf")).to(dtype)[:, None, None]
        self.read = read
        if read is not None:
            self.read_rows, self.read_pos = read.nonzero(as_tuple=True)
        self.rotary = cfg.positional_embedding_type == "rotary"
        if self.rotary:
            # positions follow the mask (TransformerLens' convention): cumsum - 1, pads at 0
            position = (mask.long().cumsum(1) - 1).clamp(min=0)
            attn = self.blocks[0].attn if self.blocks else model.blocks[0].attn
            if int(position.max()) >= attn.rotary_cos.shape[0]:
                raise ValueError("positions beyond the rotary table: use TransformerLens' forward")
            self.rot_dim = cfg.rotary_dim
            cos, sin = attn.rotary_cos[position], attn.rotary_sin[position]  # [batch, key, rot]
            self.cos_q, self.sin_q = cos[:, prefix:, None], sin[:, prefix:, None]
            cos_k, sin_k = cos[:, :prefix, None], sin[:, :prefix, None]
        self.layers = []
        for i, block in enumerate(self.blocks):
            attn = block.attn
            entry = cache.entries[start + i]
            keys, values = entry.past_keys, entry.past_values  # [batch, prefix, n_kv, d_head]
            if self.rotary:
                keys = self._rotate(keys, cos_k, sin_k)
            w_q, w_k, w_v, b_k, b_v = self._projections(attn)
            mlp = block.mlp
            # the scores' 1 / attn_scale moves into the queries (exact when it is a power
            # of two, as sqrt(d_head) is for d_head 64 or 256)
            scale = 1 / attn.attn_scale
            w_qkv, b_qkv = _fold(
                block.ln1,
                torch.cat([w_q * scale, w_k, w_v]).detach(),
                _bias(torch.cat([attn.b_Q.reshape(-1) * scale, b_k, b_v])),
            )
            gated = isinstance(mlp, GatedMLP)
            w_in, b_in = _fold(block.ln2, _mlp_in(mlp), None if gated else _bias(mlp.b_in))
            self.layers.append(
                _Layer(
                    w_qkv=w_qkv,
                    b_qkv=b_qkv,
                    w_o=attn.W_O.permute(2, 0, 1).reshape(cfg.d_model, -1).detach(),
                    b_o=_bias(attn.b_O),
                    w_in=w_in,
                    b_in=b_in,
                    b_act=_bias(mlp.b_in) if gated else None,
                    gated=gated,
                    w_out=mlp.W_out.detach().T,
                    b_out=_bias(mlp.b_out),
                    keys=keys.permute(0, 2, 1, 3).contiguous(),
                    values=values.permute(0, 2, 1, 3).contiguous(),
                )
            )

    def _projections(self, attn) -> tuple[Tensor, ...]:
        """Q, K, V weights as ``[heads d_head, d_model]`` and the K, V biases (flat)."""
        d_model = self.cfg.d_model
        w_q = attn.W_Q.permute(0, 2, 1).reshape(-1, d_model)
        if isinstance(attn, GroupedQueryAttention):
            w_k, w_v, b_k, b_v = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            w_k, w_v, b_k, b_v = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        return (
            w_q,
            w_k.permute(0, 2, 1).reshape(-1, d_model),
            w_v.permute(0, 2, 1).reshape(-1, d_model),
            b_k.reshape(-1),
            b_v.reshape(-1),
        )

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary embedding of ``x`` ``[batch, pos, heads, d_head]`` (TransformerLens' order of
        operations: ``x_rot * cos + flipped * sin``, then the unrotated dimensions)."""
        x_rot = x[..., : self.rot_dim]
        if self.cfg.rotary_adjacent_pairs:
            flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
        else:
            half = self.rot_dim // 2
            flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        rotated = x_rot * cos + flip * sin
        if self.rot_dim == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., self.rot_dim :]], dim=-1)

    def __call__(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        pattern_rows: Int[Tensor, " rows"] | None = None,
        pattern_queries: Int[Tensor, "rows query"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor | None]:
        """Final hidden states, and (if ``pattern_rows`` is given) the attention pattern of
        rows ``pattern_rows`` at their queries ``pattern_queries`` (positions of the
        continuation) in every block run: ``[rows, block, head_index, query, key]`` (keys:
        the prefix columns, then the continuation's)."""
        kept = []
        n_layers = len(self.layers)
        for i, (block, layer) in enumerate(zip(self.blocks, self.layers, strict=True)):
            last = i == n_layers - 1 and self.read is not None
            resid, pattern = self._block(block, layer, resid, last)
            if pattern_rows is not None:
                rows = pattern[pattern_rows]  # [rows, head, pos, key]
                index = pattern_queries[:, None, :, None].expand(
                    -1, rows.shape[1], -1, rows.shape[3]
                )
                kept.append(rows.gather(2, index))
        if self.cfg.normalization_type is not None:
            resid = _norm(self.model.ln_final, resid)
        rows = torch.stack(kept, dim=1) if pattern_rows is not None else None
        return resid, rows

    def _block(self, block, layer: _Layer, resid: Tensor, last: bool) -> tuple[Tensor, Tensor]:
        n_rows, n_pos, _ = resid.shape
        h, kv, g, dh = self.n_heads, self.n_kv, self.group, self.d_head
        x = _normalised(block.ln1, resid)  # ln1's scale and shift are in w_qkv, b_qkv
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv)  # [batch, pos, (h + 2 kv) dh]
        qk, v = qkv.view(n_rows, n_pos, -1, dh).split([h + kv, kv], dim=2)
        if self.rotary:  # queries and keys in one go
            qk = self._rotate(qk, self.cos_q, self.sin_q)
        q, k = qk.split([h, kv], dim=2)
        # queries by key-value head: [batch, kv, g pos, dh] (head = kv g + group member)
        q = q.view(n_rows, n_pos, kv, g, dh).permute(0, 2, 3, 1, 4).reshape(n_rows, kv, -1, dh)
        keys = torch.cat([layer.keys, k.transpose(1, 2)], dim=2)  # [batch, kv, key, dh]
        values = torch.cat([layer.values, v.transpose(1, 2)], dim=2)
        scores = q @ keys.transpose(-1, -2)  # the queries carry 1 / attn_scale
        scores = scores.view(n_rows, kv, g, n_pos, -1) + self.bias
        pattern = torch.softmax(scores, dim=-1)  # no query row is fully masked
        z = pattern.view(n_rows, kv, g * n_pos, -1) @ values  # [batch, kv, g pos, dh]
        z = z.view(n_rows, kv, g, n_pos, dh).permute(0, 3, 1, 2, 4).reshape(n_rows, n_pos, -1)
        attn_out = F.linear(z, layer.w_o, layer.b_o)
        pattern = pattern.view(n_rows, h, n_pos, -1)
        if self.cfg.parallel_attn_mlp:
            mlp_in, resid_mid = resid, resid + attn_out
        else:
            mlp_in = resid_mid = resid + attn_out
        if last:  # only the positions read after the last block
            mlp_in = mlp_in[self.read_rows, self.read_pos]
            out = resid_mid[self.read_rows, self.read_pos] + self._mlp(block, layer, mlp_in)
            full = resid_mid.new_full(resid_mid.shape, float("nan"))  # NaN: not read
            full[self.read_rows, self.read_pos] = out
            return full, pattern
        return resid_mid + self._mlp(block, layer, mlp_in), pattern

    def _mlp(self, block, layer: _Layer, resid: Tensor) -> Tensor:
        x = _normalised(block.ln2, resid)  # ln2's scale and shift are in w_in, b_in
        act = block.mlp.act_fn
        pre = F.linear(x, layer.w_in, layer.b_in)
        if layer.gated:  # act(x W_gate) * (x W_in) + b_in, both products in one
            gate, up = pre.chunk(2, dim=-1)
            hidden = act(gate) * up
            if layer.b_act is not None:
                hidden = hidden + layer.b_act
        else:
            hidden = act(pre)
        return F.linear(hidden, layer.w_out, layer.b_out)


def suffix_forward(
    model: HookedTransformer,
    cache,
    attention_mask: Tensor,
    start: int,
    read: Tensor | None = None,
) -> SuffixForward | None:
    """A :class:`SuffixForward`, or None when the model needs TransformerLens' forward."""
    if unsupported(model) is not None:
        return None
    try:
        return SuffixForward(model, cache, attention_mask, start, read)
    except ValueError:  # positions beyond the rotary table
        return None


def step_flops(
    model: HookedTransformer, n_rows: int, n_pos: int, prefix: int, start: int, n_read: int
) -> dict[str, int]:
    """Floating-point operations of one forward and backward pass of :class:`SuffixForward`
    (``n_rows`` x ``n_pos`` positions after a ``prefix``-column cache, blocks ``start`` on,
    ``n_read`` positions read and unembedded), counted from the shapes: matrix products only
    (2 per multiply-add), the backward computing input gradients only (one product per weight
    product, two per attention product). Keys: ``forward``, ``backward``, ``total``."""
    cfg = model.cfg
    d, dh, h = cfg.d_model, cfg.d_head, cfg.n_heads
    kv = cfg.n_key_value_heads or h
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    tokens = n_rows * n_pos
    blocks = cfg.n_layers - start
    attn_weights = d * (h + 2 * kv) * dh + h * dh * d  # Q, K, V and O, per token
    attn_products = 2 * h * dh * (prefix + n_pos)  # scores and pattern x values, per query
    weights = 2 * tokens * blocks * attn_weights
    if blocks:
        weights += 2 * mlp * (tokens * (blocks - 1) + n_read)  # the last block: read only
    attention = 2 * tokens * blocks * attn_products
    unembed = 2 * n_read * d * cfg.d_vocab
    forward = weights + attention + unembed
    backward = weights + 2 * attention + unembed
    return {"forward": forward, "backward": backward, "total": forward + backward}


__all__: Sequence[str] = (
    "SuffixForward",
    "has_hooks",
    "step_flops",
    "suffix_forward",
    "unsupported",
)

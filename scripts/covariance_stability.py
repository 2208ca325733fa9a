"""How many tokens does C = E[kkᵀ] need before C⁻¹k is stable? (docs/RESULTS.md)

Samples a corpus from the embedded model (the preset's sampler, cached), splits its *texts*
into two disjoint halves, and for growing token counts compares ROME's update direction
C⁻¹k between the halves, for the keys k of 40 edit prompts of the embedded dataset:

* relative difference ‖a − b‖ / mean(‖a‖, ‖b‖) and cosine of a = C_A⁻¹k, b = C_B⁻¹k;
* the same for the edit's response on 4000 held-out keys k' (k'ᵀa / aᵀk), which is what
  leaks into other facts;
* optionally with shrinkage C → (1 − ρ) C + ρ tr(C)/d I.

    python scripts/covariance_stability.py [--layer 4] [--texts 800]
"""

import argparse

import torch

from attndrift import capture, data, encoding, models
from attndrift.editing import covariance, kit, rome


@torch.no_grad()
def keys_per_text(model, layer: int, texts: list[str], text_tokens: int) -> list[torch.Tensor]:
    name = models.mlp_key_hook(layer)
    rows = [encoding.encode_prompt(model, t).ids[:text_tokens] for t in texts]
    out = []
    for i in range(0, len(rows), 32):
        chunk = rows[i : i + 32]
        k = capture.record(model, encoding.pad(model, chunk), {name: None}, stop_at_layer=layer + 1)
        out += [k[name][j, : len(r)].double() for j, r in enumerate(chunk)]
    return out


def _shrunk_solve(c: torch.Tensor, rho: float, rhs: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(c), dtype=c.dtype) * torch.trace(c) / len(c)
    return torch.linalg.solve((1 - rho) * c + rho * eye, rhs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer", type=int, default=None, help="default: the preset's ROME layer")
    p.add_argument("--texts", type=int, default=768)
    p.add_argument("--text-tokens", type=int, default=128)
    a = p.parse_args()
    model = models.load_model("smollm2-135m")
    layer = a.layer if a.layer is not None else rome.preset(model).layer
    texts = covariance.sampled_corpus(model, a.texts, a.text_tokens, seed=0)
    keys = keys_per_text(model, layer, texts, a.text_tokens)
    name = models.mlp_key_hook(layer)
    records = data.load_embedded().records[:40]
    prompts, subjects = [r.request.prompt for r in records], [r.request.subject for r in records]
    q = kit.keys_at_subject(model, prompts, subjects, [name], layer + 1)[name]
    queries = q.double().T  # [d_mlp, 40]
    held = torch.cat(keys[-64:])  # texts in neither half
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:4000]]
    pool = keys[:-64]
    half = len(pool) // 2
    print(f"layer {layer}, {len(texts)} sampled texts of {a.text_tokens} tokens; halves of "
          f"{half} texts; 40 edit keys, {len(held)} held-out keys")  # fmt: skip
    print(
        f"{'tokens/half':>11} {'rho':>5} {'rel.diff':>9} {'cos min':>8} {'response rel.diff':>18}"
    )
    n = 32
    while n <= half:
        ka, kb = torch.cat(pool[:n]), torch.cat(pool[half : half + n])
        ca, cb = ka.T @ ka / len(ka), kb.T @ kb / len(kb)
        for rho in (0.0, 0.1):
            x, y = (_shrunk_solve(c, rho, queries) for c in (ca, cb))
            rel = (x - y).norm(dim=0) / ((x.norm(dim=0) + y.norm(dim=0)) / 2)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=0)
            rx, ry = held @ x / (x * queries).sum(0), held @ y / (y * queries).sum(0)
            resp = (rx - ry).norm(dim=0) / ((rx.norm(dim=0) + ry.norm(dim=0)) / 2)
            print(f"{len(ka):>11} {rho:>5} {rel.median():>9.3f} {cos.min():>8.3f} "
                  f"{resp.median():>18.3f}")  # fmt: skip
        n *= 2


if __name__ == "__main__":
    main()

"""Benchmark: batched patching sweep vs TransformerLens' one forward per cell; capture memory.

On the embedded SmolLM2 and one DNS prompt of the embedded dataset, with a quick ROME edit
(identity covariance, few value steps: a crude edit, enough to make the two runs differ):

1. a full layer x position restore sweep of both components (attention pattern rows, MLP
   outputs; window 1) with :func:`attndrift.analysis.patching.restore`, then the same cells with
   ``transformer_lens.patching.generic_activation_patch`` (one forward per cell, the other
   model's full cache); prints both times, their ratio and the largest |ΔP(o_true)|;
2. peak memory (torch profiler allocation events, CPU) of a drift capture (last-token
   attention rows, every layer) vs a full ``run_with_cache`` of the same batch of probes.

    python benchmarks/bench_patching.py [--record 0] [--steps 10] [--probes 16]
"""

import argparse
import dataclasses
import time

import torch
from _common import peak_bytes
from transformer_lens.patching import generic_activation_patch

from attndrift import capture, data, encoding, models
from attndrift.analysis import drift, patching
from attndrift.editing import rome
from attndrift.version import __version__, git_revision

TL_NAME = {"attn": "pattern", "mlp": "mlp_out"}  # TransformerLens' short activation names


def tl_sweep(model, edited, vanilla, prompt, true, new):
    """P(o_true) for every (component, layer, pos), one TransformerLens forward per cell."""
    tokens = encoding.encode_batch(model, [prompt]).tokens
    last = tokens.shape[1] - 1
    t_id = encoding.encode_answer(model, true)[0]
    cache = capture.full(vanilla, tokens)

    def metric(logits):
        return logits[0, last].float().softmax(-1)[t_id]

    def set_pattern(act, index, clean):
        act[:, :, index[1], :] = clean[:, :, index[1], :]
        return act

    def set_mlp(act, index, clean):
        act[:, index[1]] = clean[:, index[1]]
        return act

    out = []
    with torch.no_grad(), model.hooks(fwd_hooks=list(edited.hooks)):
        for component, setter in (("attn", set_pattern), ("mlp", set_mlp)):
            out.append(
                generic_activation_patch(
                    model,
                    tokens,
                    cache,
                    metric,
                    setter,
                    TL_NAME[component],
                    index_axis_names=("layer", "pos"),
                ).cpu()
            )
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--record", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="ROME value steps (default: 10)")
    p.add_argument("--probes", type=int, default=16, help="prompts of the memory comparison")
    a = p.parse_args()
    model = models.load_model(models.EMBEDDED_MODEL)
    ds = data.load_embedded()
    record = ds.by_id(a.record)
    probe = record.probes(["DNS"])[0]
    true, new = drift.answers(probe)
    print(
        f"attndrift {__version__} ({git_revision()}), {model.cfg.model_name}, device "
        f"{models.model_device(model)}, {torch.get_num_threads()} threads"
    )

    cfg = rome.preset(model)
    cfg = dataclasses.replace(
        cfg, covariance=None, value=dataclasses.replace(cfg.value, steps=a.steps)
    )
    e = rome.edit(model, record.request, cfg)
    edited = models.Variant(model, e.hooks(model))
    print(
        f"edit: quick ROME (identity covariance, {a.steps} value steps, layer {cfg.layer}: a "
        f"crude edit for timing) of record {record.id} in {e.run.seconds:.1f} s"
    )
    n_pos = len(encoding.encode_prompt(model, probe.prompt).ids)
    n_cells = 2 * model.cfg.n_layers * n_pos
    print(f"DNS prompt ({n_pos} tokens): {probe.prompt!r}; o_true {true!r}, o_new {new!r}")
    print(f"sweep: restore, attn + mlp, window 1: {n_cells} cells")

    t = time.perf_counter()
    ours = patching.restore(model, edited, probe.prompt, true, new)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = tl_sweep(model, edited, model, probe.prompt, true, new)
    t_ref = time.perf_counter() - t
    diff = (ours.p_true - ref).abs().max().item()
    print(
        f"batched engine:                       {t_ours:7.1f} s ({n_cells / t_ours:6.1f} cells/s)"
    )
    print(f"generic_activation_patch, 1 fwd/cell: {t_ref:7.1f} s ({n_cells / t_ref:6.1f} cells/s)")
    print(f"speed-up (TransformerLens time / batched time): {t_ref / t_ours:.1f}x")
    print(f"max |ΔP(o_true)| batched vs TransformerLens: {diff:.2e}")

    probes = record.probes(["RS", "DNS", "RS_D"])[: a.probes]
    batch = encoding.encode_batch(model, [x.prompt for x in probes], [x.subject for x in probes])
    peak_capture, cap = peak_bytes(lambda: capture.run(edited, batch, queries="last"))
    peak_full, cache = peak_bytes(lambda: capture.full(edited, batch.tokens))
    kept_capture = cap.pattern.numel() * cap.pattern.element_size()
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.values()
    }
    kept_full = sum(storages.values())  # views share storage: count each once
    print(
        f"memory, {len(probes)} prompts x {batch.tokens.shape[1]} tokens: drift capture peak "
        f"{peak_capture / 2**20:.1f} MiB (keeps {kept_capture / 2**20:.2f} MiB), full "
        f"run_with_cache peak {peak_full / 2**20:.1f} MiB (keeps {kept_full / 2**20:.1f} MiB)"
    )
    print(f"peak memory ratio (full cache / drift capture): {peak_full / peak_capture:.1f}x")


if __name__ == "__main__":
    main()

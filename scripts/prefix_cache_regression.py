"""No regression in the science: a sweep with the prefix-cached value optimisation gives the
per-probe numbers of the full forward (the reference path, ``ValueConfig.prefix_cache=False``).

Both sweeps run in this process on the same records and settings (ROME and ROME+SADR, a short
step budget); every probe's P(right) and P(wrong) after the edit, and every drift number, are
compared. Prints the largest differences and exits 1 if one exceeds ``--tol``.

    python scripts/prefix_cache_regression.py DATA [--records 0-9] [--steps 10] [--gamma 0.2]
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from attndrift import data, models
from attndrift.editing import setting
from attndrift.experiments import results, sweep


def _ids(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def _sweep(model, records, settings, out: Path, full_forward: bool) -> list[results.Line]:
    config = setting.Setting.config

    def reference(self, m):  # the same config with the full forward
        cfg = config(self, m)
        return dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, prefix_cache=False))

    setting.Setting.config = reference if full_forward else config
    try:
        sweep.run(model, records, settings, out, progress=False)
    finally:
        setting.Setting.config = config
    return sorted(results.read(out), key=lambda line: line.key)


def _numbers(line: results.Line) -> dict[str, np.ndarray]:
    """The line's numbers by kind (the stored drift numbers are rounded: factor to 5 decimals,
    per layer to 4, so a difference there is at least one unit of that rounding)."""
    d = line.drift
    return {
        "P(right), P(wrong)": np.asarray([(p.p_right, p.p_wrong) for p in line.post]).ravel(),
        "P(o_new) of drift": np.asarray(d.p_new, dtype=float),
        "drift factor (5 dp)": np.asarray(d.factor, dtype=float),
        "drift per layer (4 dp)": np.ravel(np.asarray(d.per_layer, dtype=float)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--records", default="0-9")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()
    model = models.load_model(models.EMBEDDED_MODEL)
    records = data.load_dataset(a.data).select(ids=_ids(a.records)).records
    settings = [setting.Setting(steps=a.steps), setting.Setting(sadr_gamma=a.gamma, steps=a.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        ref = _sweep(model, records, settings, Path(tmp) / "full.jsonl", full_forward=True)
        new = _sweep(model, records, settings, Path(tmp) / "cached.jsonl", full_forward=False)
    assert [x.key for x in ref] == [x.key for x in new], "the two sweeps wrote other lines"
    worst = 0.0
    for s in settings:
        pairs = [(r, n) for r, n in zip(ref, new, strict=True) if r.setting.key == s.key]
        same_steps = all(r.steps_run == n.steps_run for r, n in pairs)
        print(f"{s.key}: {len(pairs)} records; same steps run: {same_steps}; max |Δ|:")
        for kind in _numbers(pairs[0][0]):
            diffs = [np.abs(_numbers(r)[kind] - _numbers(n)[kind]) for r, n in pairs]
            diff = max((float(np.nanmax(d)) for d in diffs if d.size), default=0.0)
            print(f"  {kind:<24} {diff:.2e} over {sum(d.size for d in diffs)} numbers")
            worst = max(worst, diff)
    print(f"largest difference {worst:.2e} (tolerance {a.tol:g})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())

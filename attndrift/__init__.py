"""attndrift: attention drift in edited language models, and SADR-regularised editing.

Public API (everything else is reachable through the modules listed in ``__all__``).

The package is layered (``tests/test_layers.py``): base, data and scoring modules at the top
level, :mod:`attndrift.models`, then :mod:`attndrift.editing` and :mod:`attndrift.analysis`
side by side, :mod:`attndrift.plotting`, :mod:`attndrift.experiments` and
:mod:`attndrift.cli`. The modules keep their short names here (``attndrift.rome``,
``attndrift.drift``, ``attndrift.sweep`` …).
"""

import sys

from attndrift import (
    analysis,
    capture,
    data,
    editing,
    encoding,
    evaluation,
    experiments,
    generation,
    metrics,
    models,
    plotting,
    scoring,
)
from attndrift.analysis import cells, drift, knockout, patching, tracing
from attndrift.data import Dataset, EditRequest, Probe, Record, load_dataset, load_embedded
from attndrift.editing import (
    alphaedit,
    covariance,
    edits,
    layer_loop,
    memit,
    pmet,
    registry,
    rome,
    sadr,
    setting,
    value,
)
from attndrift.editing import kit as editors
from attndrift.editing.alphaedit import AlphaEditConfig
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit, applied
from attndrift.editing.memit import MemitConfig
from attndrift.editing.pmet import PmetConfig
from attndrift.editing.rome import RomeConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig
from attndrift.evaluation import Evaluation, evaluate
from attndrift.experiments import demo, report, results, summary, sweep
from attndrift.models import EMBEDDED_MODEL, Variant, load_model, tiny_model
from attndrift.version import __version__

__all__ = [
    "EMBEDDED_MODEL",
    "AlphaEditConfig",
    "CovarianceConfig",
    "Dataset",
    "Edit",
    "EditRequest",
    "Evaluation",
    "MemitConfig",
    "PmetConfig",
    "Probe",
    "Record",
    "RomeConfig",
    "SadrConfig",
    "ValueConfig",
    "Variant",
    "__version__",
    "alphaedit",
    "analysis",
    "applied",
    "capture",
    "cells",
    "covariance",
    "data",
    "demo",
    "drift",
    "editing",
    "editors",
    "edits",
    "encoding",
    "evaluate",
    "evaluation",
    "experiments",
    "generation",
    "knockout",
    "layer_loop",
    "load_dataset",
    "load_embedded",
    "load_model",
    "memit",
    "metrics",
    "models",
    "patching",
    "plotting",
    "pmet",
    "registry",
    "report",
    "results",
    "rome",
    "sadr",
    "scoring",
    "setting",
    "summary",
    "sweep",
    "tiny_model",
    "tracing",
    "value",
]

#: the module paths of the flat layout, kept for code written against it: ``import
#: attndrift.rome`` or ``from attndrift.patching import patch`` gets the very module object of
#: its sub-package (a monkeypatch through an old path reaches the code that runs)
FLAT_LAYOUT = {
    "alphaedit": alphaedit,
    "covariance": covariance,
    "editors": editors,  # attndrift.editing.kit
    "edits": edits,
    "layer_loop": layer_loop,
    "memit": memit,
    "pmet": pmet,
    "registry": registry,
    "rome": rome,
    "sadr": sadr,
    "setting": setting,
    "value": value,
    "cells": cells,
    "drift": drift,
    "knockout": knockout,
    "patching": patching,
    "tracing": tracing,
    "demo": demo,
    "report": report,
    "results": results,
    "summary": summary,
    "sweep": sweep,
}
for _name, _module in FLAT_LAYOUT.items():
    sys.modules[f"{__name__}.{_name}"] = _module
del _name, _module

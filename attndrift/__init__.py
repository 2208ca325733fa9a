"""attndrift: attention drift in edited language models, and SADR-regularised editing.

Public API (everything else is reachable through the modules listed in ``__all__``).
"""

from attndrift import (
    alphaedit,
    capture,
    cells,
    covariance,
    data,
    demo,
    drift,
    editors,
    edits,
    encoding,
    evaluation,
    generation,
    knockout,
    layer_loop,
    memit,
    metrics,
    models,
    patching,
    plotting,
    pmet,
    registry,
    report,
    results,
    rome,
    sadr,
    scoring,
    setting,
    summary,
    sweep,
    tracing,
    value,
)
from attndrift.alphaedit import AlphaEditConfig
from attndrift.covariance import CovarianceConfig
from attndrift.data import Dataset, EditRequest, Probe, Record, load_dataset, load_embedded
from attndrift.edits import Edit, applied
from attndrift.evaluation import Evaluation, evaluate
from attndrift.memit import MemitConfig
from attndrift.models import EMBEDDED_MODEL, Variant, load_model, tiny_model
from attndrift.pmet import PmetConfig
from attndrift.rome import RomeConfig
from attndrift.sadr import SadrConfig
from attndrift.value import ValueConfig
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
    "applied",
    "capture",
    "cells",
    "covariance",
    "data",
    "demo",
    "drift",
    "editors",
    "edits",
    "encoding",
    "evaluate",
    "evaluation",
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

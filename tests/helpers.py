"""Helpers shared by several test modules."""

import dataclasses
import json

from attndrift import data, results, setting

REQUEST = data.EditRequest(
    subject="Eiffel Tower",
    prompt="The Eiffel Tower is located in the city of",
    target_true="Paris",
    target_new="Rome",
)


def make_line(
    record: int, probes: list[tuple[str, int]], steps_run: int | None = None, **fields
) -> results.Line:
    """A sweep line of the tiny model's preset under ``Setting(**fields)`` whose edited
    probes succeed as given: ``[(kind, 1 or 0), ...]`` (the unedited ones all fail)."""
    s = setting.Setting(**fields)
    config = json.loads(json.dumps(dataclasses.asdict(s.config("tiny-llama"))))
    post = tuple(results.ProbeScore(k, 0.6 if ok else 0.4, 0.5) for k, ok in probes)
    pre = tuple(results.ProbeScore(k, 0.4, 0.5) for k, _ in probes)
    return results.Line(
        record=record,
        setting=s,
        editor=s.editor,
        layers=(1,),
        request=REQUEST,
        pre=pre,
        post=post,
        fluency_pre=None,
        fluency_post=None,
        drift=results.DriftScores((), (), (), (), (), ()),
        steps_run=steps_run if steps_run is not None else config["value"]["steps"],
        final={},
        config=config,
        seconds={},
        provenance=None,
    )

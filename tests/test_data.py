import json
from pathlib import Path

import pytest

from attndrift import data

FIXTURES = Path(__file__).parent / "fixtures"


def _merged(**overrides):
    record = {
        "requested_rewrite": {
            "prompt": "The Eiffel Tower is located in the city of",
            "subject": "Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
        },
        "p-paraphrase": {"prompts": ["Where is the Eiffel Tower? In"], "targets": ["Rome"]},
        "l-neighbor": {"prompts": ["The Louvre is in the city of"], "targets": ["Paris"]},
        "l-relation": {"prompts": ["The Eiffel Tower was designed by"], "targets": ["Eiffel"]},
    }
    record.update(overrides)
    return record


def _write(tmp_path, records) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return path


def test_probe_table_matches_spec():
    rec = data.parse_record(_merged(), 3)
    probes = {p.kind: p for p in rec.probes()}
    assert probes["ES"].prompt == "The Eiffel Tower is located in the city of"
    assert (probes["ES"].right, probes["ES"].wrong) == ("Rome", "Paris")
    assert (probes["PS"].right, probes["PS"].wrong) == ("Rome", "Paris")
    assert (probes["NS"].right, probes["NS"].wrong) == ("Paris", "Rome")
    assert (probes["RS"].right, probes["RS"].wrong) == ("Eiffel", "Rome")
    prefix = "The Eiffel Tower is located in the city of Rome. "
    assert probes["DNS"].prompt == prefix + "The Louvre is in the city of"
    assert (probes["DNS"].right, probes["DNS"].wrong) == ("Paris", "Rome")
    assert probes["RS_D"].prompt == prefix + "The Eiffel Tower was designed by"
    assert all(p.record == 3 and p.subject == "Eiffel Tower" for p in probes.values())
    assert "AS" not in probes  # no p-subject_alias in this record


def test_absent_probe_sets_are_none_and_empty_ones_are_empty():
    rec = data.parse_record(_merged(**{"l-relation": {"prompts": [], "targets": []}}), 0)
    assert rec.relation == ()
    assert "RS" in rec.available() and not [p for p in rec.probes() if p.kind == "RS"]
    with pytest.raises(data.DataError, match=r"p-paraphrase\.prompts': expected a list"):
        data.parse_record(_merged(**{"p-paraphrase": None}), 0)
    rec2 = data.parse_record({"requested_rewrite": _merged()["requested_rewrite"]}, 0)
    assert rec2.neighborhood is None and rec2.relation is None and rec2.paraphrase_prompts is None
    assert rec2.available() == ("ES",)
    assert [p.kind for p in rec2.probes()] == ["ES"]


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"subject": "Colosseum"}, "requested_rewrite.prompt", "does not contain subject"),
        ({"target_new": " "}, "requested_rewrite.target_new", "empty"),
        ({"target_new": "Paris"}, "requested_rewrite.target_new", "equals target_true"),
    ],
)
def test_malformed_records_name_record_and_field(tmp_path, change, field, problem):
    bad = _merged()
    bad["requested_rewrite"] = {**bad["requested_rewrite"], **change}
    path = _write(tmp_path, [_merged(), bad])
    with pytest.raises(data.DataError) as err:
        data.load_dataset(path)
    assert err.value.record == 1 and err.value.field == field and problem in str(err.value)
    lenient = data.load_dataset(path, lenient=True)
    assert len(lenient) == 1
    assert lenient.skipped == (data.Skipped(1, field, lenient.skipped[0].problem),)


def test_missing_fields_and_mismatched_targets(tmp_path):
    no_subject = _merged()
    del no_subject["requested_rewrite"]["subject"]
    with pytest.raises(
        data.DataError, match=r"record 0: field 'requested_rewrite\.subject': missing"
    ):
        data.load_dataset(_write(tmp_path, [no_subject]))
    uneven = _merged(**{"l-neighbor": {"prompts": ["a", "b"], "targets": ["Paris"]}})
    with pytest.raises(data.DataError, match="2 prompts but 1 targets"):
        data.load_dataset(_write(tmp_path, [uneven]))
    with pytest.raises(data.DataError, match="missing"):
        data.load_dataset(_write(tmp_path, [{"rewrite": {}}]))


def test_not_a_list_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected a JSON list"):
        data.load_dataset(_write(tmp_path, {"a": 1}))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.load_dataset(tmp_path / "nope.json")


def test_rome_format_fixture():
    ds = data.load_dataset(FIXTURES / "rome_counterfact_sample.json")
    assert [r.id for r in ds.records] == [7, 9]
    r = ds.by_id(7)
    assert r.request.prompt == "The mother tongue of Danielle Darrieux is"
    assert r.request.template == "The mother tongue of {} is"
    assert (r.request.target_new, r.request.target_true) == ("English", "French")
    assert r.relation is None and r.source == "rome"
    assert r.neighborhood == (
        ("The mother tongue of Léon Blum is", "French"),
        ("Michel Rocard's mother tongue is", "French"),
    )
    kinds = [p.kind for p in r.probes()]
    assert kinds.count("PS") == 2 and kinds.count("DNS") == 2 and "RS" not in kinds


def test_rome_template_without_placeholder_is_rejected(tmp_path):
    rec = json.loads((FIXTURES / "rome_counterfact_sample.json").read_text())[0]
    rec["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    with pytest.raises(data.DataError, match="no '\\{\\}'"):
        data.load_dataset(_write(tmp_path, [rec]))


def test_dev_file_loads_and_half_has_each_probe_family(dev_data_path):
    ds = data.load_dataset(dev_data_path)
    assert len(ds) == 1200 and ds.skipped == ()
    with_neighbors = sum(r.neighborhood is not None for r in ds.records)
    with_relations = sum(r.relation is not None for r in ds.records)
    assert with_neighbors == 600 and with_relations > 500
    assert all(r.request.subject in r.request.prompt for r in ds.records)


def test_the_shipped_sample_has_both_halves(sample_data_path):
    ds = data.load_dataset(sample_data_path)
    assert [r.id for r in ds.records] == list(range(1160, 1200)) and ds.skipped == ()
    assert sum(r.neighborhood is not None for r in ds.records) == 20  # CounterFact half
    assert sum(r.relation is not None for r in ds.records) == 20  # WikiData half
    assert (sample_data_path.parent / "LICENSE-merged_counterfact.txt").exists()


def test_select_and_by_id():
    ds = data.Dataset(tuple(data.parse_record(_merged(), i) for i in range(5)))
    assert [r.id for r in ds.select(ids=[3, 1]).records] == [3, 1]
    assert len(ds.select(limit=2)) == 2
    with pytest.raises(KeyError, match="no record with id 9"):
        ds.by_id(9)


def test_edit_request_validation():
    with pytest.raises(ValueError, match="must contain the subject"):
        data.EditRequest(
            subject="Colosseum",
            prompt="The Eiffel Tower is in",
            target_true="Paris",
            target_new="Rome",
        )
    with pytest.raises(ValueError, match="non-empty"):
        data.EditRequest(
            subject="", prompt="The Eiffel Tower is in", target_true="Paris", target_new="Rome"
        )


def test_cli_record_ranges():
    from attndrift.cli.common import _ids

    assert _ids("3,5,10-12") == [3, 5, 10, 11, 12]
    with pytest.raises(ValueError):
        _ids("a-b")

import json

import pytest
import torch

from attndrift import encoding, models
from attndrift.editing import covariance

TEXTS = ["The Eiffel Tower is in Paris.", "Rome", "Toko Yasuda plays the guitar very well"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path))
    return tmp_path


def test_second_moment_by_hand(tiny):
    c, used = covariance.second_moment(tiny, 2, TEXTS, n_tokens=10_000, batch_tokens=16)
    keys = []
    n_bos = len(models.bos_prefix(tiny))
    for t in TEXTS:
        ids = torch.tensor([encoding.encode_prompt(tiny, t).ids])
        _, cache = tiny.run_with_cache(ids, names_filter=models.mlp_key_hook(2))
        keys.append(cache[models.mlp_key_hook(2)][0, n_bos:])
    k = torch.cat(keys)
    assert used == k.shape[0]

    def by_hand(k):  # float64 like the accumulator; tolerance scaled to C's magnitude
        k = k.double()
        return (k.T @ k / k.shape[0]).float()

    want = by_hand(k)
    torch.testing.assert_close(c, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    c5, used5 = covariance.second_moment(tiny, 2, TEXTS, n_tokens=5)
    assert used5 == 5
    want5 = by_hand(k[:5])
    torch.testing.assert_close(c5, want5, atol=1e-5 * want5.abs().max().item(), rtol=1e-5)


def test_cache_is_used_and_corruption_is_detected(tiny, cache, monkeypatch, caplog):
    cfg = covariance.CovarianceConfig(corpus=tuple(TEXTS), n_tokens=20)  # of its 22 tokens
    first = covariance.layer_covariance(tiny, 1, cfg, progress=False)
    files = list((cache / "covariance").glob("*.safetensors"))
    assert len(files) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed although the cache is valid")

    monkeypatch.setattr(covariance, "second_moment", fail)
    assert torch.equal(covariance.layer_covariance(tiny, 1, cfg, progress=False), first)
    monkeypatch.undo()
    monkeypatch.setenv("ATTNDRIFT_CACHE", str(cache))

    # tamper with the stored matrix: checksum mismatch -> recomputed, never used
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(files[0], "pt") as f:
        meta = f.metadata()
    stats = load_file(files[0])["mom2"]
    save_file({"mom2": stats * 2}, files[0], metadata=meta)
    again = covariance.layer_covariance(tiny, 1, cfg, progress=False)
    assert torch.equal(again, first) and "checksum" in caplog.text
    files[0].write_bytes(b"garbage")
    assert torch.equal(covariance.layer_covariance(tiny, 1, cfg, progress=False), first)
    assert "unreadable" in caplog.text
    # another layer or token count is another entry
    covariance.layer_covariance(tiny, 2, cfg, progress=False)
    covariance.layer_covariance(tiny, 1, covariance.CovarianceConfig(tuple(TEXTS), n_tokens=15))
    assert len(list((cache / "covariance").glob("*.safetensors"))) == 3


def test_corpus_sources(tiny, tmp_path, cache):
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps([{"Text": "a b"}, "c d"]))
    cfg = covariance.CovarianceConfig(corpus=str(as_json))
    assert covariance.corpus_texts(tiny, cfg) == ["a b", "c d"]
    as_txt = tmp_path / "c.txt"
    as_txt.write_text("one\n\ntwo\n")
    assert covariance.corpus_texts(tiny, covariance.CovarianceConfig(corpus=str(as_txt))) == [
        "one",
        "two",
    ]
    with pytest.raises(FileNotFoundError, match="no such file"):
        covariance.corpus_texts(tiny, covariance.CovarianceConfig(corpus="nope.json"))
    with pytest.raises(ValueError, match="no tokens"):
        covariance.second_moment(tiny, 0, ["  "], n_tokens=5)


def test_sampled_corpus_is_seeded_cached_and_nested(tiny, cache):
    small = covariance.sampled_corpus(tiny, 3, 6, seed=1)
    assert len(small) == 3 and small == covariance.sampled_corpus(tiny, 3, 6, seed=1)
    big = covariance.sampled_corpus(tiny, 130, 6, seed=1)  # two chunks of 128
    assert big[:3] == small and len(big) == 130
    assert covariance.sampled_corpus(tiny, 5, 6, seed=1) == big[:5]
    assert covariance.sampled_corpus(tiny, 3, 6, seed=2) != small


def test_samples_corpus_is_cached_and_shared_across_layers(tiny, cache, monkeypatch):
    from attndrift import generation

    cfg = covariance.CovarianceConfig(n_tokens=64, text_tokens=4)
    covariance.layer_covariance(tiny, 1, cfg, progress=False)
    assert len(list((cache / "corpora").glob("*.json"))) == 1

    def fail(*a, **k):
        raise AssertionError("the corpus was sampled again")

    monkeypatch.setattr(generation, "sample", fail)
    covariance.layer_covariance(tiny, 2, cfg, progress=False)  # same corpus, another layer

import json

import pytest
import torch

from attndrift import encoding, models

FACTS = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The capital of Japan is the city of", " Tokyo"),
    ("The mother tongue of a person born in Madrid is", " Spanish"),
]


def test_tiny_models_are_deterministic_and_leave_global_rng(tiny):
    state = torch.random.get_rng_state()
    again = models.tiny_model(_arch(tiny), seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (n, a), (_, b) in zip(tiny.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    other = models.tiny_model(_arch(tiny), seed=1)
    assert not torch.equal(other.blocks[0].mlp.W_out, tiny.blocks[0].mlp.W_out)


def _arch(model) -> str:
    return model.cfg.model_name.split("-")[1]


def test_tiny_architectures_have_their_features():
    gpt2, gptj, llama = (models.tiny_model(a) for a in models.TINY_ARCHS)
    assert gpt2.cfg.positional_embedding_type == "standard" and gpt2.cfg.normalization_type == "LN"
    assert gptj.cfg.parallel_attn_mlp and gptj.cfg.positional_embedding_type == "rotary"
    assert llama.cfg.gated_mlp and llama.cfg.n_key_value_heads == 2
    assert llama.cfg.normalization_type == "RMS"


def test_fast_layout_keeps_logits_bit_identical(tiny):
    tokens = encoding.encode_batch(tiny, ["The Eiffel Tower is in Paris", "Rome"]).tokens
    with torch.no_grad():
        before = tiny(tokens)
        plain = models.tiny_model(_arch(tiny), seed=0)
        for p in plain.parameters():  # undo the layout: contiguous copies
            p.data = p.data.contiguous()
        assert torch.equal(plain(tokens), before)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        models.load_model("no-such-model", device="cpu")


def test_unknown_tiny_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        models.tiny_model("mamba")


def test_layer_check(tiny):
    with pytest.raises(ValueError, match="out of range"):
        models.mlp_out_weight(tiny, tiny.cfg.n_layers)


def test_gguf_config_comes_from_metadata():
    cfg = models.smollm2_config_from_gguf(models.embedded_gguf_path())
    assert (cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["n_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert cfg["d_mlp"] == 1536 and cfg["d_vocab"] == 49152 and cfg["rotary_base"] == 100000.0
    assert cfg["default_prepend_bos"] is False


@pytest.mark.slow
def test_embedded_matches_dequantised_hf_model(smollm):
    hf = models.load_embedded_hf()
    prompts = [p for p, _ in FACTS] + ["Toko Yasuda plays the", "Hello"]
    for prompt in prompts:
        ids = torch.tensor([encoding.encode_prompt(smollm, prompt).ids])
        with torch.no_grad():
            diff = (smollm(ids) - hf(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


@pytest.mark.slow
def test_embedded_knows_well_known_facts(smollm):
    for prompt, answer in FACTS:
        ids = torch.tensor([encoding.encode_prompt(smollm, prompt).ids])
        with torch.no_grad():
            top = smollm(ids)[0, -1].argmax().item()
        assert smollm.tokenizer.decode([top]) == answer, prompt


@pytest.mark.slow
def test_embedded_has_no_bos_and_cache_is_reused(smollm, tmp_path, monkeypatch):
    assert models.bos_prefix(smollm) == []
    ids = encoding.encode_prompt(smollm, "Paris").ids
    assert smollm.tokenizer.decode(list(ids)) == "Paris"
    cache = models.embedded._embedded_cache()
    meta = json.loads((cache / "attndrift.json").read_text())
    assert meta["source_sha256"] == models.EMBEDDED_GGUF_SHA256
    assert meta["weights_bytes"] == (cache / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_truncated_cache_is_detected(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"123")
    (target / "attndrift.json").write_text(json.dumps({"weights_bytes": 999}))
    assert not models.embedded._cache_complete(target)
    (target / "attndrift.json").write_text("{not json")
    assert not models.embedded._cache_complete(target)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_hf_checkpoint_loads_unprocessed(arch, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = models.tiny_tokenizer()
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)
        cfg.n_ctx = 64  # TransformerLens 3.9 reads it (hub GPT-2 configs carry it)
        hf = GPT2LMHeadModel(cfg)
    else:
        hf = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=len(tok),
                max_position_embeddings=64,
            )
        )
    hf.eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = models.load_model(str(tmp_path), device="cpu")
    ids = torch.tensor([encoding.encode_prompt(model, "The Eiffel Tower is in Paris").ids])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-5
    # unprocessed: norms keep their weights (not folded into LNPre) and W_out is HF's own
    assert model.cfg.normalization_type in ("LN", "RMS")
    w_out = (
        hf.transformer.h[1].mlp.c_proj.weight
        if arch == "gpt2"
        else (hf.model.layers[1].mlp.down_proj.weight.T)
    )
    assert torch.equal(models.mlp_out_weight(model, 1), w_out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        models.load_model(str(tmp_path / "empty"), device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_places_the_model_where_its_config_says(tiny, dtype):
    # build takes device and dtype from the config alone (the loaders put them there): the
    # parameters come out in cfg.dtype on cfg.device, with the state's values
    from transformer_lens import HookedTransformerConfig

    from attndrift.models.building import build

    fields = tiny.cfg.to_dict() | {"device": "cpu", "dtype": dtype, "init_weights": False}
    fields = {k: v for k, v in fields.items() if k in HookedTransformerConfig.__dataclass_fields__}
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    model = build(HookedTransformerConfig(**fields), tiny.tokenizer, state)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert {p.device.type for p in params.values()} == {"cpu"}
    for name, p in tiny.named_parameters():
        assert torch.equal(params[name], p.to(dtype)), name
    if dtype == torch.float32:  # the same weights, the same logits
        tokens = encoding.encode_batch(tiny, ["The Eiffel Tower is in Paris"]).tokens
        with torch.no_grad():
            assert torch.equal(model(tokens), tiny(tokens))

"""Tiny random models of the three architectures that matter for editing, for tests.

GPT-2 (learned positions), GPT-J (rotary, parallel attention and MLP) and Llama (rotary,
RMS norm, gated MLP, grouped-query attention), 4 layers of d_model 64, with an offline
byte-level BPE tokenizer trained on a fixed corpus: no downloads, deterministic.
"""

from typing import Literal

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from attndrift.models.building import fast_layout, quiet_tl_deprecation

TinyArch = Literal["gpt2", "gptj", "llama"]
TINY_ARCHS: tuple[TinyArch, ...] = ("gpt2", "gptj", "llama")
TINY_NAMES = tuple(f"tiny-{a}" for a in TINY_ARCHS)


_TINY_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar. Miles Davis plays the trumpet.",
    "The capital of France is Paris, the capital of Italy is Rome.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "Lionel Messi plays soccer. LeBron James plays basketball.",
    "The official language of Japan is Japanese. Berlin is the capital of Germany.",
    "The Louvre museum is in Paris. Big Ben is in London. The Kremlin is in Moscow.",
    "What does Freddy Cole play? They play jazz. Sonny Simmons performs poetry.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 512) trained offline on a fixed corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        # name and add_bos_token tell TransformerLens to keep this tokenizer (no hub reload)
        name_or_path="attndrift-tiny",
        add_bos_token=True,
    )


def tiny_config(arch: str, d_vocab: int) -> dict:
    """Config fields of a 4-layer random model in the style of ``arch``."""
    common = {
        "n_layers": 4,
        "d_model": 64,
        "n_heads": 4,
        "d_head": 16,
        "d_mlp": 128,
        "n_ctx": 256,
        "d_vocab": d_vocab,
        # larger than GPT-2's 0.02 so that random attention is peaked, not uniform
        "initializer_range": 0.15,
    }
    if arch == "gpt2":
        return common | {
            "model_name": "tiny-gpt2",
            "original_architecture": "GPT2LMHeadModel",
            "act_fn": "gelu_new",
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
            "default_prepend_bos": True,
        }
    if arch == "gptj":
        return common | {
            "model_name": "tiny-gptj",
            "original_architecture": "GPTJForCausalLM",
            "act_fn": "gelu_new",
            "normalization_type": "LN",
            "positional_embedding_type": "rotary",
            "rotary_dim": 8,
            "rotary_adjacent_pairs": True,
            "parallel_attn_mlp": True,
            "default_prepend_bos": True,
        }
    if arch == "llama":
        return common | {
            "model_name": "tiny-llama",
            "original_architecture": "LlamaForCausalLM",
            "act_fn": "silu",
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_dim": 16,
            "gated_mlp": True,
            "n_key_value_heads": 2,
            "final_rms": True,
            "default_prepend_bos": False,
        }
    raise ValueError(f"unknown tiny architecture {arch!r}: expected one of {TINY_ARCHS}")


#: GPT-2 small's sizes, for timing a real-sized random model (``tiny_model(..., **GPT2_SMALL)``)
GPT2_SMALL = {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_head": 64, "d_mlp": 3072,
              "n_ctx": 1024, "d_vocab": 50257, "initializer_range": 0.02}  # fmt: skip


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    **sizes: int | float,
) -> HookedTransformer:
    """A small random :class:`HookedTransformer` (4 layers, d_model 64) for tests.

    Deterministic in ``seed``; the global RNG state is left untouched. Biases and norm gains
    are random too (not 0 and 1), so that tests exercise them. ``sizes`` override config
    fields (e.g. :data:`GPT2_SMALL` for a GPT-2-sized random model to time; its vocabulary
    keeps the tiny tokenizer's ids, which is all a timing needs).
    """
    tokenizer = tiny_tokenizer()
    fields = tiny_config(arch, d_vocab=len(tokenizer)) | sizes
    fields["model_name"] = f"{fields['model_name']}-s{seed}" + ("-sized" if sizes else "")
    cfg = HookedTransformerConfig(**fields, device=str(device or "cpu"), dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet_tl_deprecation():
            model = HookedTransformer(cfg, tokenizer, default_padding_side="right")
        with torch.no_grad():
            for name, p in model.named_parameters():
                last = name.split(".")[-1]
                if last.startswith(("b_", "_b_")) or last == "b":  # biases, norm biases
                    p.normal_(0.0, 0.05)
                elif last == "w":  # norm gains: not all ones, so that forgetting one shows
                    p.normal_(1.0, 0.3)
    return fast_layout(model).eval()

"""Tiny random configs of the real architectures (Llama, Qwen3, Gemma) for CPU tests."""

import torch

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def tiny_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = {**COMMON, **overrides}

    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False)
    if family == "gemma":
        return Gemma3TextConfig(**common, sliding_window=8, final_logit_softcapping=30.0)
    raise ValueError(family)


def tiny_target(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype).eval()

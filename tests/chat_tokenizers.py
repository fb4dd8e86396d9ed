"""Tiny real (byte-level BPE) tokenizers with Qwen3-style and Llama-3-style chat templates.

Built offline in milliseconds, so template and loss-mask tests need no hub. The Jinja templates
are written here from the formats' public descriptions (ChatML with `<think>` blocks; Llama 3
header/eot tokens).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there! How are you today?",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Let me think step by step. 2 + 2 = 4, so the answer is 4.",
    "You are a helpful assistant. Write a short poem about the sea.",
]

QWEN3_STYLE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set c = m.content -%}{%- set r = '' -%}"
    "{%- if '</think>' in c -%}"
    "{%- set r = c.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.last -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + r + '\\n</think>\\n\\n' + c + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer(specials: list[str], template: str, eos: str, vocab_size: int = 400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0])
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos, specials[0])]})
    fast.chat_template = template
    return fast


def qwen3_style():
    return make_tokenizer(QWEN3_SPECIALS, QWEN3_STYLE, eos="<|im_end|>")


def llama3_style():
    return make_tokenizer(LLAMA3_SPECIALS, LLAMA3_STYLE, eos="<|eot_id|>")

"""Loss masks token by token against hand-built expectations (SmolLM2, Qwen3-style, Llama-3-style)."""

import pytest

from chat_tokenizers import llama3_style, qwen3_style
from draftsmith.data.templates import render_records, render_sample
from draftsmith.utils.io import InputError


def expected(tok, segments):
    """Concatenate (text, mask) segments tokenized one by one: the hand-built expectation."""
    ids, mask = [], []
    for text, m in segments:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [m] * len(part)
    return ids, mask


def check(tok, record, segments, **kw):
    sample = render_sample(tok, record, **kw)
    want_ids, want_mask = expected(tok, segments)
    assert sample.input_ids == want_ids
    assert sample.loss_mask == want_mask
    return sample


def conv(*turns, finish_reason=None):
    roles = {"s": "system", "u": "user", "a": "assistant"}
    rec = {"id": "r1", "conversations": [{"role": roles[r], "content": c} for r, c in turns]}
    if finish_reason:
        rec["finish_reason"] = finish_reason
    return rec


SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_smollm2_mask_default_system_and_multiturn(smol_tokenizer):
    tok = smol_tokenizer
    rec = conv(("u", "Hello there!"), ("a", "Hi. How are you?"), ("u", "Fine."), ("a", "Good to hear."))
    check(tok, rec, [
        ("<|im_start|>", 0), ("system\n" + SYS, 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user\nHello there!", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("Hi. How are you?", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user\nFine.", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("Good to hear.", 1), ("<|im_end|>", 1), ("\n", 0),
    ])


def test_smollm2_length_capped_answer_has_no_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    rec = conv(("s", "Be brief."), ("u", "Count."), ("a", "one two three four"), finish_reason="length")
    s = check(tok, rec, [
        ("<|im_start|>", 0), ("system\nBe brief.", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user\nCount.", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("one two three four", 1),
    ])
    assert s.length_capped and tok.convert_tokens_to_ids("<|im_end|>") not in s.input_ids[-3:]


def test_capped_middle_turn_keeps_context_but_not_its_eot(smol_tokenizer):
    tok = smol_tokenizer
    rec = conv(("s", "S"), ("u", "A?"), ("a", "loop loop"), ("u", "B?"), ("a", "Done."))
    rec["conversations"][2]["finish_reason"] = "length"
    rec["conversations"][4]["finish_reason"] = "stop"
    check(tok, rec, [
        ("<|im_start|>", 0), ("system\nS", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user\nA?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("loop loop", 1), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user\nB?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("Done.", 1), ("<|im_end|>", 1), ("\n", 0),
    ])


def test_qwen3_style_thinking_block_is_part_of_the_answer():
    tok = qwen3_style()
    rec = conv(("u", "What is 2 + 2?"), ("a", "<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4."))
    check(tok, rec, [
        ("<|im_start|>", 0), ("user\nWhat is 2 + 2?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0),
        ("<think>", 1), ("\n2 + 2 = 4\n", 1), ("</think>", 1), ("\n\nThe answer is 4.", 1),
        ("<|im_end|>", 1), ("\n", 0),
    ])


def test_qwen3_style_template_added_empty_think_is_not_taught():
    tok = qwen3_style()
    rec = conv(("u", "Hello"), ("a", "Hi there"), ("u", "Bye"), ("a", "Bye now"), finish_reason="length")
    check(tok, rec, [
        ("<|im_start|>", 0), ("user\nHello", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("Hi there", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user\nBye", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("<think>", 0), ("\n\n", 0), ("</think>", 0),
        ("\n\n", 0), ("Bye now", 1),
    ])


def test_llama3_style_mask_and_truncation():
    tok = llama3_style()
    rec = conv(("s", "Be kind."), ("u", "Say hello"), ("a", "Hello! How are you today?"))
    segments = [
        ("<|begin_of_text|>", 0), ("<|start_header_id|>", 0), ("system", 0), ("<|end_header_id|>", 0),
        ("\n\nBe kind.", 0), ("<|eot_id|>", 0),
        ("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0), ("\n\nSay hello", 0),
        ("<|eot_id|>", 0),
        ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
        ("Hello! How are you today?", 1), ("<|eot_id|>", 1),
    ]
    full = check(tok, rec, segments)
    cut = render_sample(tok, rec, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.input_ids == full.input_ids[:-3] and cut.loss_mask == full.loss_mask[:-3]


def test_missing_template_and_unrenderable_records_are_reported():
    tok = llama3_style()
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        render_sample(tok, conv(("u", "x"), ("a", "y")))
    tok = llama3_style()
    # the Llama-3 template trims content, so a whitespace-only answer cannot be located
    samples, stats = render_records(tok, [conv(("u", "x"), ("a", "y")), conv(("u", "x"), ("a", "  "))],
                                    max_length=8, progress=False)
    assert stats.records == 2 and len(samples) == 1 and len(stats.problems) == 1
    assert "conversations[1]" in stats.problems[0] and stats.truncated == 1

"""Eval prompt sets and how their turns become target prompts.

A dataset is a JSONL file with one `{"turns": [str, ...]}` object per line (DESIGN §1): every
user turn is answered in sequence, and the prompt of turn k holds the conversation so far.
`--datasets` entries are either a path to such a file or a name, resolved as DESIGN §1 says:
`--eval-dir/NAME.jsonl`, then `$DRAFTSMITH_EVAL_DIR/NAME.jsonl`. The last step of that order (a
download of the public benchmark converted to DeepSpec's prompt format) is not built in here:
this package ships no hub converter, so a name found in neither directory is an error that lists
the names that are available.

Records that are not usable (no `turns`, an empty turn, a non-string turn) are rejected one by
one with a reason and counted (`EvalDataset.rejected`); they are never fatal and never silent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.utils.io import InputError, JsonlProblem, iter_jsonl

EVAL_DIR_ENV = "DRAFTSMITH_EVAL_DIR"
# the public benchmarks DeepSpec converted (shared/eval holds them)
KNOWN_DATASETS = ("gsm8k", "mt-bench", "humaneval", "mbpp")
# special tokens that end an assistant turn in the chat formats we know, when the tokenizer has them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
                      "<|end|>", "<eos>")


@dataclass
class EvalDataset:
    """The usable records of one dataset (each a list of user turns), in file order."""

    name: str
    path: Path
    records: list[list[str]]
    rejected: list[str] = field(default_factory=list)  # "file:line: reason" per rejected record

    @property
    def num_turns(self) -> int:
        return sum(len(r) for r in self.records)


def split_list(text: str) -> list[str]:
    """"a, b,c" -> ["a", "b", "c"] (empty entries dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _search_dirs(eval_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    dirs = []
    if eval_dir:
        dirs.append(("--eval-dir", Path(eval_dir).expanduser()))
    if os.environ.get(EVAL_DIR_ENV):
        dirs.append((f"${EVAL_DIR_ENV}", Path(os.environ[EVAL_DIR_ENV]).expanduser()))
    return dirs


def available_names(eval_dir: str | os.PathLike | None = None) -> list[str]:
    """Dataset names that resolve: the `*.jsonl` files of the search directories."""
    names = {p.stem for _, d in _search_dirs(eval_dir) if d.is_dir() for p in d.glob("*.jsonl")}
    return sorted(names)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".jsonl") or os.sep in spec or spec.startswith(".")


def resolve_dataset(spec: str, eval_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """A `--datasets` entry -> (display name, JSONL path). A path names itself by its stem."""
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"dataset {spec!r}: file not found")
        return path.stem, path
    searched = _search_dirs(eval_dir)
    for _, d in searched:
        path = d / f"{spec}.jsonl"
        if path.is_file():
            return spec, path
    where = ", ".join(f"{label} = {d}" for label, d in searched) or \
        f"nowhere (pass --eval-dir or set ${EVAL_DIR_ENV})"
    found = available_names(eval_dir)
    raise InputError(
        f"unknown dataset {spec!r}: no {spec}.jsonl in {where}. "
        f"Available there: {', '.join(found) or 'none'}; the public benchmarks are "
        f"{', '.join(KNOWN_DATASETS)} (shared/eval holds them); a JSONL path also works "
        "(one {\"turns\": [...]} object per line)")


def _record_problem(obj: dict) -> str | None:
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        return "field 'turns' must be a non-empty list of strings"
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            return f"turns[{i}] is {type(turn).__name__}, expected a string"
        if not turn.strip():
            return f"turns[{i}] is empty"
    return None


def load_dataset(spec: str, eval_dir: str | os.PathLike | None = None,
                 max_samples: int | None = None) -> EvalDataset:
    """Resolve and read a dataset; `max_samples` keeps the first N usable records."""
    name, path = resolve_dataset(spec, eval_dir)
    problems: list[JsonlProblem] = []
    data = EvalDataset(name, path, [])
    for lineno, obj in iter_jsonl(path, problems):
        if max_samples is not None and len(data.records) >= max_samples:
            break
        problem = _record_problem(obj)
        if problem:
            data.rejected.append(f"{path}:{lineno}: {problem}")
        else:
            data.records.append(list(obj["turns"]))
    data.rejected[:0] = [str(p) for p in problems]
    if not data.records:
        raise InputError(f"dataset {spec!r} ({path}): no usable records"
                         + (f" ({len(data.rejected)} rejected, first: {data.rejected[0]})" if data.rejected else ""))
    return data


# --------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, turns: list[str], answers: list[str]) -> list[int]:
    """Token ids of the prompt for turn len(answers): the user turns so far with the given
    assistant answers in between, rendered with the target's chat template and its
    generation prompt (`add_generation_prompt=True`)."""
    if len(answers) >= len(turns):
        raise ValueError(f"{len(answers)} answers for {len(turns)} turns: nothing left to answer")
    messages = []
    for user, assistant in zip(turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": turns[len(answers)]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(tokenizer, model_config=None, generation_config=None) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS, the end-of-turn special tokens it has
    (`END_OF_TURN_TOKENS`), and the model's configured EOS ids."""
    ids = set(_as_list(tokenizer.eos_token_id))
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for token in END_OF_TURN_TOKENS:
        if token in specials:
            ids.add(int(tokenizer.convert_tokens_to_ids(token)))
    for cfg in (model_config, generation_config):
        if cfg is not None:
            ids.update(_as_list(getattr(cfg, "eos_token_id", None)))
    if not ids:
        raise InputError("the target's tokenizer has no EOS / end-of-turn token: answers could "
                         "only stop at --max-new-tokens")
    return sorted(ids)


def decode_answer(tokenizer, ids: list[int], stop_ids) -> str:
    """Generated ids -> the assistant text that goes back into the conversation (stop token
    and other special tokens dropped)."""
    stop = set(stop_ids)
    return tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)

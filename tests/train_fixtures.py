"""Tiny trainable setups: random Llama/Qwen3/Gemma targets saved as HF dirs with a real (tiny BPE)
tokenizer and chat template, conversation data, and recipes sized to run in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from chat_tokenizers import CORPUS, qwen3_style
from tiny_targets import tiny_target

VOCAB = 416  # >= the tiny tokenizer's size


def make_target_dir(root: Path, family: str, seed: int = 0) -> Path:
    out = root / f"tiny-{family}"
    if (out / "config.json").is_file():
        return out
    tok = qwen3_style()
    model = tiny_target(family, seed=seed, vocab_size=VOCAB)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(12, 30)))
            rec = {"id": f"r{i}", "conversations": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}
            f.write(json.dumps(rec) + "\n")
    return path


def make_recipe(path: Path, target: Path, drafter: str, **sections) -> Path:
    model = {"num_hidden_layers": 1, "block_size": 3, "mask_token_id": 0, "target_layer_ids": [0, 2],
             "num_anchors": 8, "markov_rank": 8}
    if drafter == "dflash":
        model.pop("markov_rank")
    if drafter == "eagle3":
        model = {"target_layer_ids": [0, 1, 2], "ttt_length": 3}
    recipe = {"drafter": drafter, "target": str(target), "model": model,
              "data": {"max_length": 96, "heldout_fraction": 0.2},
              # fp32 pinned: `auto` would pick bf16 on AMX CPUs and fp32 elsewhere, and these
              # recipes must compute the same on every machine (auto is tested in test_train_inputs)
              "features": {"mode": "online", "dtype": "fp32", "target_dtype": "fp32"},
              "optim": {"lr": 3e-3, "warmup_ratio": 0.1},
              "train": {"epochs": 2, "global_batch": 4, "micro_batch": 2, "checkpoint_every": 4,
                        "eval_every": 4, "threads": 1, "precision": "fp32"}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path

"""Cost-only variants of a trained DSpark/DFlash draft, to measure what each part of it costs when
served (`bench/served.py`), before training a smaller draft: fewer layers, fewer tapped target
layers, a smaller draft vocabulary. The weights are sliced out of the trained draft, so a
variant's τ means nothing — only its serving cost does.

    .venv/bin/python bench/draft_variants.py RUN/step_latest OUT \
        --variant L2:layers=2 --variant L1T1:layers=1,taps=27 --variant L1T1V2k:layers=1,taps=27,vocab=2048
    .venv/bin/python bench/served.py --target smollm2-135m \
        --draft "L1T1-idle=OUT/L1T1@dtype=q8_0,n_max=1,p_min=1" --draft "L1T1=OUT/L1T1@dtype=q8_0,n_max=1,p_min=0" ...

At `p_min 1` a served draft runs every round but never proposes: its ratio to plain decoding is
the price of an idle round (reading the target's features, the draft's forward).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from draftsmith.config import build_config
from draftsmith.models.io import WEIGHTS_FILE, build_draft, load_weights, read_draft_config, save_draft
from draftsmith.utils.io import InputError


def parse_variant(spec: str) -> tuple[str, dict]:
    """`NAME:layers=1,taps=27+21,vocab=2048` -> (name, {layers, taps, vocab})."""
    name, _, opts = spec.partition(":")
    out = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in ("layers", "taps", "vocab") or not value:
            raise InputError(f"--variant {spec!r}: expected NAME:layers=N,taps=A+B,vocab=V")
        out[key] = [int(v) for v in value.split("+")] if key == "taps" else int(value)
    if not name:
        raise InputError(f"--variant {spec!r}: a name is needed")
    return name, out


def make_variant(src: Path, dst: Path, layers: int | None = None, taps: list[int] | None = None,
                 vocab: int | None = None) -> int:
    """Write a sliced copy of the draft dir `src` to `dst` (rebuilt from its typed config and
    saved like any draft, so it validates on load); returns its parameter count."""
    cfg = read_draft_config(src)
    w = load_file(src / WEIGHTS_FILE)
    update = {}
    if layers is not None:
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise InputError(f"layers={layers}: the draft has {cfg.num_hidden_layers}")
        w = {k: v for k, v in w.items() if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
        update["num_hidden_layers"] = layers
    if taps is not None:
        ids, h = list(cfg.target_layer_ids), cfg.hidden_size
        if not set(taps) <= set(ids):
            raise InputError(f"taps={taps}: the draft taps {ids}")
        cols = torch.cat([torch.arange(ids.index(t) * h, (ids.index(t) + 1) * h) for t in taps])
        w["fc.weight"] = w["fc.weight"][:, cols].contiguous()  # [H, L*H] -> [H, L'*H]
        update["target_layer_ids"] = list(taps)
    if vocab is not None:
        for k in ("lm_head.weight", "markov_head.markov_w2.weight", "d2t"):
            if k in w:
                w[k] = w[k][:vocab].contiguous()
        update["draft_vocab_size"] = vocab
    small = build_config(type(cfg), {**cfg.model_dump(), **update}, where=f"variant of {src}")
    model = load_weights(build_draft(small), w, f"variant of {src}")
    save_draft(model, dst)
    if (src / "training.json").exists():
        shutil.copy(src / "training.json", dst / "training.json")
    return sum(v.numel() for v in w.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("draft", type=Path, help="a trained draft dir (RUN/step_N)")
    ap.add_argument("out", type=Path, help="where the variant dirs go (OUT/NAME)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:layers=N,taps=A+B,vocab=V")
    args = ap.parse_args(argv)
    if (args.out.exists() and any(args.out.iterdir())):
        raise InputError(f"{args.out}: not empty; choose a new dir")
    for name, opts in (parse_variant(v) for v in args.variant or ["full:"]):
        n = make_variant(args.draft, args.out / name, **opts)
        print(f"{args.out / name}: {opts or 'unchanged'}, {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

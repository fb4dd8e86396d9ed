"""Every drafter variant × export format, hashed file by file: what pins the export bytes.

`export_hashes(root)` builds tiny drafts with fixed seeds (tiny random Llama and Gemma targets),
exports each one in every format and returns {"case/format": {file: sha256}}, or
{"case/format": "refused"} where the format does not take the draft. Before hashing, the values
that differ between runs or releases are replaced in the raw bytes (so the formatting itself is
still compared): the package version, the tmp root, the source config's sha256 (it hashes a file
that carries the version) and the target's revision (a fingerprint of files transformers wrote).

GGUF: llama.cpp's converter is replaced by a stand-in whose output file lists the sha256 of every
file it was handed and the outtype, and the read-back check by one that returns the metadata
draftsmith expects (`gguf.expected_metadata`): the bytes draftsmith controls are pinned here; the
real converter and check run in test_export.py.

The fixture `fixtures/export_sha256.json` was generated from the exporters as they were before
the drafter registry (issue 16); regenerate it only for an intended format change:

    PYTHONPATH=src python tests/export_reference.py tests/fixtures/export_sha256.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "export_sha256.json"
FORMATS = ("deepspec", "sglang", "vllm", "speculators", "gguf", "draftsmith")
BLOCK = {"num_hidden_layers": 2, "block_size": 3, "mask_token_id": 5, "target_layer_ids": [0, 2],
         "num_anchors": 8}
EAGLE3 = {"target_layer_ids": [0, 1, 2], "ttt_length": 3}
# case -> (target family, config class name, draft vocabulary (None: full), config fields)
CASES = {
    "dspark": ("llama", "DSparkConfig", None, {**BLOCK, "markov_rank": 8}),
    "dspark-pruned": ("llama", "DSparkConfig", 100, {**BLOCK, "markov_rank": 8}),
    "dspark-rnn-noconf": ("llama", "DSparkConfig", None, {**BLOCK, "markov_rank": 8,
                                                          "markov_head_type": "rnn",
                                                          "enable_confidence_head": False}),
    "dspark-gemma": ("gemma", "DSparkConfig", None, {**BLOCK, "markov_rank": 8,
                                                     "attention_k_eq_v": True}),
    "dflash": ("llama", "DFlashConfig", None, dict(BLOCK)),
    "dflash-pruned": ("llama", "DFlashConfig", 100, dict(BLOCK)),
    "dflash-zlab": ("llama", "DFlashConfig", None, {**BLOCK, "slot_semantics": "zlab",
                                                    "block_size": 5}),
    "dflash-zlab-pruned": ("llama", "DFlashConfig", 50, {**BLOCK, "slot_semantics": "zlab"}),
    "eagle3": ("llama", "Eagle3Config", None, dict(EAGLE3)),
    "eagle3-pruned-nbr": ("llama", "Eagle3Config", 64, {**EAGLE3, "norm_before_residual": True}),
}


def _config_class(name: str):
    from draftsmith.models.dflash import DFlashConfig
    from draftsmith.models.dspark import DSparkConfig
    from draftsmith.models.eagle3 import Eagle3Config

    return {"DSparkConfig": DSparkConfig, "DFlashConfig": DFlashConfig,
            "Eagle3Config": Eagle3Config}[name]


def make_case(root: Path, case: str) -> Path:
    """The draft of `case` saved as root/case/step_1, with a recipe.json naming its target."""
    import torch
    from transformers import AutoModelForCausalLM

    from draftsmith.models.io import build_draft, save_draft
    from train_fixtures import make_target_dir

    family, cls_name, vocab, fields = CASES[case]
    target_dir = make_target_dir(root / "targets", family)
    hf = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    cfg = _config_class(cls_name).from_target(hf.config, **fields, draft_vocab_size=vocab)
    seed = zlib.crc32(case.encode())
    torch.manual_seed(seed)
    model = build_draft(cfg)
    kept = None
    if vocab:
        gen = torch.Generator().manual_seed(seed)
        kept = torch.sort(torch.randperm(cfg.vocab_size, generator=gen)[:vocab]).values
    model.init_from_target(hf, kept)
    run = root / "drafts" / case
    save_draft(model, run / "step_1")
    (run / "recipe.json").write_text(json.dumps({"drafter": cfg.drafter, "target": str(target_dir),
                                                 "data": {"max_length": 96}}))
    return run / "step_1"


def _normalizer(root: Path, src: Path):
    from draftsmith import __version__

    config_sha = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    swaps = [(str(root), "<root>"), (f'"{__version__}"', '"<version>"'),
             (config_sha, "<config-sha256>")]

    def normalize(data: bytes) -> bytes:
        for old, new in swaps:
            data = data.replace(old.encode(), new.encode())
        return data

    return normalize


def _digest(path: Path, normalize) -> str:
    return hashlib.sha256(normalize(path.read_bytes())).hexdigest()


class GGUFStandIns:
    """Swap llama.cpp's converter and the GGUF read-back for recorders (see the docstring)."""

    def __init__(self, normalize=lambda data: data):
        self.normalize = normalize

    def convert(self, staging, out_file, outtype="f16", target_model_dir=None):
        staged = {p.name: _digest(p, self.normalize) for p in sorted(Path(staging).iterdir())}
        Path(out_file).write_text(json.dumps({"staged": staged, "outtype": outtype}, indent=1))
        return Path(out_file)

    @staticmethod
    def check(path, cfg, manifest):
        from draftsmith.export import gguf

        return gguf.expected_metadata(cfg)

    def __enter__(self):
        from draftsmith.engines import llama_cpp
        from draftsmith.export import gguf

        self.saved = (llama_cpp.convert_hf_to_gguf, gguf.check_gguf)
        llama_cpp.convert_hf_to_gguf, gguf.check_gguf = self.convert, self.check
        return self

    def __exit__(self, *exc):
        from draftsmith.engines import llama_cpp
        from draftsmith.export import gguf

        llama_cpp.convert_hf_to_gguf, gguf.check_gguf = self.saved


def export_case(root: Path, case: str) -> dict:
    """{"case/format": {file: sha256} or "refused"} for one case."""
    from draftsmith.export import export
    from draftsmith.utils.io import InputError

    src = make_case(root, case)
    normalize = _normalizer(root, src)
    out = {}
    for fmt in FORMATS:
        dst = root / "exports" / case / fmt
        try:
            with GGUFStandIns(normalize):
                export(src, fmt, dst, dtype="fp16" if fmt == "gguf" else "bf16")
        except InputError:
            out[f"{case}/{fmt}"] = "refused"
            continue
        manifest = json.loads((dst / "draftsmith_manifest.json").read_text())
        revision = manifest["target"]["revision"]
        files = {}
        for path in sorted(dst.iterdir()):
            data = normalize(path.read_bytes()).replace(revision.encode(), b"<revision>")
            files[path.name] = hashlib.sha256(data).hexdigest()
        out[f"{case}/{fmt}"] = files
    return out


def export_hashes(root: Path) -> dict:
    out = {}
    for case in CASES:
        out.update(export_case(root, case))
    return out


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory(prefix="draftsmith-export-ref-") as tmp:
        hashes = export_hashes(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sys.argv[1]}: {len(hashes)} case/format pairs")

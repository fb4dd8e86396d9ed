"""GGUF through llama.cpp's own converter, checked after conversion (DESIGN §2, §3.1, §4).

The converter comes from the same pinned source as `llama-server` (`engines.llama_cpp`). It is fed
the dialect it reads correctly: DeepSpec's layout for DSpark / DFlash (the pruned llama.cpp
extension included), z-lab's for a z-lab DFlash, and the vLLM dialect for EAGLE-3 (from SGLang's
nested key it would silently fall back to its default layers). Before converting, drafts llama.cpp
cannot serve are refused with the reason; after converting, the GGUF's metadata and tensor names
are read back and checked against the manifest.

llama.cpp surprise handled here: a full-vocabulary DSpark/DFlash GGUF that carries the draft's
own `token_embd` but no `output` (the converter drops a full-vocabulary `lm_head`) makes
llama.cpp reuse `token_embd` as the LM head — a tied head, wrong for targets with untied
embeddings. The draft's embedding is a frozen copy of the target's, so the staged checkpoint
leaves it out and llama.cpp takes both the embedding and the head from the target.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

from torch import nn

from draftsmith.engines import llama_cpp
from draftsmith.engines.llama_cpp import LLAMA_CPP_VERSION
from draftsmith.export.deepspec import block_files
from draftsmith.export.eagle3 import eagle3_files
from draftsmith.export.formats import FormatAdapter, WriteContext, most_specific
from draftsmith.export.manifest import TargetInfo, target_hf_dir, write_engine_dir
from draftsmith.models.dspark import DSparkConfig
from draftsmith.models.eagle3 import Eagle3Config
from draftsmith.utils.io import InputError, read_json_file
from draftsmith.utils.paths import cache_root

GGUF_FILE = "draft.gguf"
OUTTYPES = {"bf16": "bf16", "fp16": "f16", "fp32": "f32", "q8_0": "q8_0"}
DRAFT_GGUF_TYPES = tuple(OUTTYPES)  # what `export --format gguf --dtype` writes


class GGUFFormat(FormatAdapter):
    """`--format gguf` for one family of drafts: staged in the dialect llama.cpp's converter
    reads, converted, read back and checked. Subclasses say what llama.cpp calls the family
    (`arch`), what it cannot serve, how to stage it, what the GGUF must hold and how
    llama-server runs it."""

    name = "gguf"
    holds = "llama.cpp's GGUF"
    readable: ClassVar[bool] = False
    arch: ClassVar[str] = ""  # general.architecture

    def servable_problems(self, cfg) -> list[str]:
        return []

    def stage(self, model: nn.Module, dtype_name: str, verifier: dict) -> tuple[dict, dict]:
        """(config, tensors) of the checkpoint handed to the converter."""
        raise NotImplementedError

    def metadata(self, cfg) -> dict:
        """GGUF key/values the converter must have written (DESIGN §4)."""
        shifted = [i + 1 for i in cfg.target_layer_ids]
        return {"general.architecture": self.arch, f"{self.arch}.target_layers": shifted}

    def tensors(self, cfg) -> tuple[set[str], set[str]]:
        """(GGUF tensor names that must be present, names that must be absent)."""
        return {"fc.weight"}, set()

    def llama_server(self, cfg) -> tuple[str, int]:
        """(--spec-type, --spec-draft-n-max) llama-server runs the draft with."""
        raise NotImplementedError

    def check(self, cfg) -> None:
        problems = self.servable_problems(cfg)
        if problems:
            raise InputError("llama.cpp cannot serve this draft, so no GGUF is written:\n"
                             + "\n".join(f"  - {p}" for p in problems))

    def layer_ids(self, cfg) -> dict:
        return {"engine_key": f"{self.arch}.target_layers",
                "engine_values": [i + 1 for i in cfg.target_layer_ids], "engine_convention": "i + 1"}

    def write(self, draft, out_dir, ctx: WriteContext) -> list[str]:
        """Stage the draft (its tensors in the export dtype) and run llama.cpp's converter with
        the matching outtype (bf16 | fp16 -> f16 | fp32 -> f32 | q8_0, quantized by the converter
        from the fp32-staged tensors; 1-D tensors stay f32)."""
        dtype_name = str(draft.fc.weight.dtype).removeprefix("torch.")
        with tempfile.TemporaryDirectory(prefix="draftsmith-gguf-") as tmp:
            staging = Path(tmp) / "draft"
            write_engine_dir(staging, *self.stage(draft, dtype_name, ctx.verifier))
            llama_cpp.convert_hf_to_gguf(staging, out_dir / GGUF_FILE, outtype=OUTTYPES[ctx.dtype],
                                         target_model_dir=target_hf_dir(ctx.target))
        return [GGUF_FILE]

    def finish(self, out_dir, cfg, manifest, ctx) -> None:
        extra = {"file": GGUF_FILE, "converter": f"llama.cpp {LLAMA_CPP_VERSION} convert_hf_to_gguf.py",
                 "outtype": OUTTYPES[ctx.dtype]}
        manifest["gguf"] = {**extra, "metadata_checked": check_gguf(out_dir / GGUF_FILE, cfg, manifest)}


class BlockGGUF(GGUFFormat):
    """DSpark / DFlash: llama.cpp's `dflash` architecture, staged in DeepSpec's layout (the pruned
    extension included) or z-lab's."""

    takes = DSparkConfig
    arch = "dflash"

    def servable_problems(self, cfg) -> list[str]:
        problems = []
        if cfg.markov_rank > 0 and cfg.markov_head_type != "vanilla":
            problems.append(f"markov_head_type {cfg.markov_head_type!r}: llama.cpp converts only the "
                            "vanilla Markov head (bias = W2·W1[prev]); the gated and rnn heads run "
                            "only in draftsmith's engine")
        if cfg.enable_confidence_head and not (cfg.confidence_head_with_markov and cfg.markov_rank > 0):
            problems.append("a confidence head without Markov features: llama.cpp's head reads "
                            "[h; W1[prev]] (H + r inputs); this one converts but llama-server fails "
                            "to load it")
        return problems + (gemma_problems(cfg) if cfg.family == "gemma" else [])

    def stage(self, model, dtype_name, verifier):
        cfg = model.config
        config, tensors = block_files(model, dtype_name)
        if not cfg.pruned and cfg.family != "gemma" and cfg.deepspec_slots:
            tensors.pop("embed_tokens.weight")  # see the module docstring
        return config, tensors

    def metadata(self, cfg) -> dict:
        expected = {**super().metadata(cfg), "dflash.block_size": cfg.block_size,
                    "tokenizer.ggml.mask_token_id": cfg.mask_token_id}
        if cfg.deepspec_slots:
            expected["dflash.sample_from_anchor"] = True
            expected["dflash.has_confidence_head"] = bool(cfg.enable_confidence_head)
        return expected

    def tensors(self, cfg) -> tuple[set[str], set[str]]:
        present, absent = super().tensors(cfg)
        if cfg.pruned:
            present |= {"output.weight", "d2t"}
        elif cfg.family != "gemma":
            absent |= {"output.weight", "token_embd.weight"}  # both shared from the target
        if cfg.markov_rank > 0:
            present |= {"markov_w1.weight", "markov_w2.weight"}
        (present if cfg.enable_confidence_head else absent).add("conf_proj.weight")
        return present, absent

    def llama_server(self, cfg) -> tuple[str, int]:
        """DeepSpec slots run as `draft-dspark` with n_max = block size (llama.cpp would otherwise
        auto-pick draft-dflash for a head-less draft and read the block one slot off); z-lab
        slots as `draft-dflash`, n_max = block size - 1 (slot 0 is the anchor)."""
        if cfg.deepspec_slots:
            return "draft-dspark", cfg.block_size
        return "draft-dflash", cfg.block_size - 1


def gemma_problems(cfg) -> list[str]:
    """What llama.cpp's Gemma DSpark does not run."""
    problems = []
    if not cfg.attention_k_eq_v:
        problems.append("a Gemma draft without attention_k_eq_v: llama.cpp's Gemma DSpark "
                        "converter requires K = V")
    if cfg.pruned:
        problems.append(f"a Gemma draft with a pruned head ({cfg.draft_vocab} of "
                        f"{cfg.vocab_size} ids): llama.cpp requires Gemma's full vocabulary")
    if cfg.final_logit_softcapping:
        problems.append(f"final_logit_softcapping {cfg.final_logit_softcapping}: llama.cpp's "
                        "Gemma DSpark does not apply a softcap, so its logits would differ")
    if cfg.hidden_act != "gelu_pytorch_tanh":
        problems.append(f"hidden_act {cfg.hidden_act!r}: llama.cpp's Gemma DSpark requires "
                        "gelu_pytorch_tanh")
    return problems


class Eagle3GGUF(GGUFFormat):
    """EAGLE-3: llama.cpp's `eagle3` architecture, staged in the vLLM dialect (from SGLang's nested
    key the converter would silently fall back to its default layers)."""

    takes = Eagle3Config
    arch = "eagle3"
    dialect = "vllm"

    def stage(self, model, dtype_name, verifier):
        return eagle3_files(model, self.dialect, dtype_name, verifier)

    def metadata(self, cfg) -> dict:
        return {**super().metadata(cfg), "eagle3.target_hidden_size": cfg.hidden_size,
                "eagle3.norm_before_residual": cfg.norm_before_residual}

    def tensors(self, cfg) -> tuple[set[str], set[str]]:
        present, absent = super().tensors(cfg)
        return present | {"output.weight", "d2t"}, absent

    def llama_server(self, cfg) -> tuple[str, int]:
        return "draft-eagle3", cfg.ttt_length


GGUF_ADAPTERS = (BlockGGUF(), Eagle3GGUF())


def gguf_adapter(cfg) -> GGUFFormat:
    adapter = most_specific(GGUF_ADAPTERS, cfg)
    if adapter is None:
        raise InputError(f"llama.cpp has no architecture for a {cfg.drafter} draft")
    return adapter


# --------------------------------------------------------------------------- what llama.cpp serves


def servable_problems(cfg) -> list[str]:
    """Why llama.cpp cannot serve this draft (empty: it can)."""
    return gguf_adapter(cfg).servable_problems(cfg)


def check_servable(cfg) -> None:
    gguf_adapter(cfg).check(cfg)


def expected_metadata(cfg) -> dict:
    """GGUF key/values the converter must have written for this draft (DESIGN §4)."""
    return gguf_adapter(cfg).metadata(cfg)


def expected_tensors(cfg) -> tuple[set[str], set[str]]:
    """(GGUF tensor names that must be present, names that must be absent)."""
    return gguf_adapter(cfg).tensors(cfg)


def serve_settings(cfg, p_min: float | None = None, n_max: int | None = None,
                   names: tuple[str, str] = ("serve.p_min", "serve.n_max")) -> dict:
    """llama.cpp settings for the draft (the manifest's `serve`, whatever the format):
    `spec_type` from the draft's GGUF adapter (`llama_server`); `n_max` (draft tokens per round)
    defaults to the most the draft proposes (its block), and may be smaller; `p_min` (truncate
    at the first slot whose σ(c_k) < p_min) needs a confidence head. `names`: what errors call
    p_min and n_max (a command passes its flags)."""
    spec_type, most = gguf_adapter(cfg).llama_server(cfg)
    if n_max is not None and not 1 <= n_max <= most:
        raise InputError(f"{names[1]} {n_max}: this {cfg.drafter} draft proposes at most {most} "
                         f"tokens per round (block_size {getattr(cfg, 'block_size', most)}); "
                         f"choose 1..{most}")
    if p_min is not None and not getattr(cfg, "enable_confidence_head", False):
        raise InputError(f"{names[0]} {p_min}: llama.cpp truncates on the confidence head and "
                         "refuses --spec-draft-p-min for a draft without one")
    n_max = most if n_max is None else n_max
    args = ["--spec-type", spec_type, "--spec-draft-n-max", str(n_max)]
    if p_min is not None:
        args += ["--spec-draft-p-min", str(p_min)]
    return {"spec_type": spec_type, "n_max": n_max, "p_min": p_min, "llama_server_args": args}


def max_n_max(cfg) -> int:
    """The most draft tokens per round this draft proposes in llama.cpp (its full block)."""
    return gguf_adapter(cfg).llama_server(cfg)[1]


# --------------------------------------------------------------------------- the measured choice

TUNING_FILE = "serve_tuning.json"  # in the draft dir: `serve-check`'s measured choice (serve.tune)
TUNING_VERSION = 3


def read_tuning(draft_dir: Path) -> dict | None:
    """DRAFT/serve_tuning.json; None when absent or of another version (measure again)."""
    data = read_json_file(Path(draft_dir) / TUNING_FILE, "delete it or rerun serve-check --retune")
    return data if isinstance(data, dict) and data.get("version") == TUNING_VERSION else None


def tuned_serve(tuning: dict | None) -> dict:
    """The serve settings a tuning chose: {dtype, n_max, p_min} (p_min 0 = off = None); {} for none."""
    choice = (tuning or {}).get("choice")
    if not choice:
        return {}
    return {"dtype": choice["dtype"], "n_max": int(choice["n_max"]), "p_min": choice["p_min"] or None}


_TENSOR_NAMES = r"""
import json, sys
from gguf import GGUFReader
print(json.dumps([t.name for t in GGUFReader(sys.argv[1], "r").tensors]))
"""


def gguf_tensor_names(path: Path) -> list[str]:
    """Tensor names of a GGUF file, read with the pinned source's gguf-py."""
    proc = subprocess.run([sys.executable, "-c", _TENSOR_NAMES, str(path)],
                          env=llama_cpp.converter_env(), capture_output=True, text=True,
                          errors="replace")
    if proc.returncode != 0:
        raise llama_cpp.LlamaCppError(f"could not read the tensors of {path}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def check_gguf(path: Path, cfg, manifest: dict) -> dict:
    """Read the GGUF back; raise LlamaCppError on any metadata or tensor mismatch with the
    manifest. Returns the checked metadata (recorded in the manifest)."""
    meta = llama_cpp.read_gguf_metadata(path)
    expected = expected_metadata(cfg)
    wrong = [f"{k}: GGUF has {meta.get(k, '<missing>')!r}, manifest expects {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if manifest["layer_ids"]["draftsmith"] != list(cfg.target_layer_ids):
        wrong.append(f"manifest layer ids {manifest['layer_ids']['draftsmith']} are not the "
                     f"draft's {list(cfg.target_layer_ids)}")
    names = set(gguf_tensor_names(path))
    present, absent = expected_tensors(cfg)
    wrong += [f"tensor {n} missing" for n in sorted(present - names)]
    wrong += [f"tensor {n} present (expected absent)" for n in sorted(absent & names)]
    if wrong:
        raise llama_cpp.LlamaCppError(f"{path}: the converted GGUF does not match the manifest:\n"
                                      + "\n".join(f"  - {w}" for w in wrong))
    return {k: meta[k] for k in expected}


# --------------------------------------------------------------------------- serving once


TARGET_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def target_gguf(info: TargetInfo, outtype: str | None = None) -> Path:
    """The target as a GGUF for llama-server: the file itself for a GGUF target (when `outtype`
    is None), else its HF dir (for a GGUF target: its dequantized weights) converted once to
    `outtype` (default f16) into the cache, keyed by the target's revision."""
    if info.source.kind == "gguf" and outtype is None:
        return info.source.gguf_path
    outtype = outtype or "f16"
    if outtype not in TARGET_OUTTYPES:
        raise InputError(f"target GGUF type {outtype!r}: choose one of {', '.join(TARGET_OUTTYPES)}")
    content_id = info.revision.startswith(("fingerprint:", "hub-commit:"))
    ident = info.revision if content_id else f"{info.name}\0{info.revision}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    out = cache_root() / "target-gguf" / f"{Path(info.name).name}-{key}-{outtype}.gguf"
    if not out.is_file():
        llama_cpp.convert_hf_to_gguf(target_hf_dir(info), out, outtype=outtype)
    return out


def serve_once(draft_gguf: str | Path, target_gguf: str | Path, manifest: dict,
               prompt: str = "Hello", max_tokens: int = 8, ctx_size: int = 512) -> dict:
    """Start llama-server with the target and this draft, the way the manifest says
    (`serve.llama_server_args`), answer one completion, stop. Returns {"reply", "log"}; raises
    LlamaCppError when the server does not load the pair."""
    args = ["-md", str(draft_gguf), *manifest["serve"]["llama_server_args"]]
    with llama_cpp.LlamaServer(target_gguf, ctx_size=ctx_size, seed=0, extra_args=args) as server:
        reply = server.post_json("/v1/completions", {"prompt": prompt, "temperature": 0,
                                                     "max_tokens": max_tokens}, timeout=120)
    return {"reply": reply, "log": server.log_text()}

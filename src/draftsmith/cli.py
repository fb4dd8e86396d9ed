"""The one `draftsmith` command. Each stage registers a subcommand; `--help` on each explains it."""

from __future__ import annotations

import argparse
import logging
import sys

from draftsmith import __version__
from draftsmith.utils.io import InputError, check_output_dir

STAGES = """pipeline: target -> data prepare -> data regenerate -> (cache) -> train -> eval (calibrate) -> export -> serve-check
run `draftsmith quickstart` for the whole chain on the embedded default (SmolLM2-135M-Instruct)."""


def _target_parser(sub) -> None:
    p = sub.add_parser("target", help="load targets, inspect them, materialize HF dirs",
                       description="Targets: an HF causal LM (hub id or local dir), a GGUF file, "
                                   "or the alias smollm2-135m (the embedded default).")
    tsub = p.add_subparsers(dest="target_cmd", required=True, metavar="{info,export-hf}")
    info = tsub.add_parser("info", help="print a target's geometry and default feature layers")
    info.add_argument("--target", default="smollm2-135m")
    info.set_defaults(func=_run_target_info)
    exp = tsub.add_parser("export-hf", help="write a plain fp32 HF model dir (config, tokenizer with "
                                            "chat template, safetensors)",
                          description="Materialize TARGET as a plain fp32 HF dir that "
                                      "AutoModelForCausalLM.from_pretrained and llama.cpp's "
                                      "converter (--target-model-dir) both load.")
    exp.add_argument("--target", default="smollm2-135m", help="alias, .gguf file, HF dir or hub id")
    exp.add_argument("--out", required=True, help="output directory (written atomically)")
    exp.set_defaults(func=_run_target_export)


def _run_target_info(args) -> int:
    import json

    from draftsmith.targets.model import describe, load_target_model

    model, source = load_target_model(args.target)
    print(json.dumps(describe(source, model), indent=2))
    return 0


def _run_target_export(args) -> int:
    from draftsmith.targets.export_hf import export_hf, summary

    check_output_dir(args.out, "--out")
    out = export_hf(args.target, args.out)
    print(summary(out))
    return 0


def _data_parser(sub) -> None:
    from draftsmith.data import prepare, regenerate

    p = sub.add_parser("data", help="prompt sources and answer regeneration",
                       description="Prepare prompt data, then regenerate the answers with the target.")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,regenerate}")
    pp = dsub.add_parser("prepare", help="read a prompt source into conversations JSONL (+ held-out split)",
                         description="Sources: sharegpt (embedded package), a JSONL file in the "
                                     "conversations format, or hf:NAME[:split]. Unusable records are "
                                     "rejected one by one with a reason and counted.")
    prepare.add_args(pp)
    pp.set_defaults(func=prepare.run)
    rp = dsub.add_parser("regenerate", help="regenerate assistant turns with the target through "
                                            "OpenAI-compatible endpoints (or a local llama-server)",
                         description="Every assistant turn is regenerated on the regenerated history. "
                                     "Exact resume keyed by record id; failures go to <out>.errors.jsonl.")
    regenerate.add_args(rp)
    rp.set_defaults(func=regenerate.run)


def _cache_parser(sub) -> None:
    from draftsmith.features import commands

    p = sub.add_parser("cache", help="estimate and build the offline, versioned feature cache",
                       description="Target features for training, stored once (the alternative to "
                                   "the default online mode, which recomputes them in the loop).")
    csub = p.add_subparsers(dest="cache_cmd", required=True, metavar="{estimate,build}")
    est = csub.add_parser("estimate", help="print bytes/token and total size (ours and DeepSpec's "
                                           "layout) without writing anything")
    commands.add_estimate_args(est)
    est.set_defaults(func=commands.run_estimate)
    build = csub.add_parser("build", help="build (or resume) a sharded cache with a versioned manifest")
    commands.add_build_args(build)
    build.set_defaults(func=commands.run_build)


def _module_command(sub, name: str, module: str, help: str, description: str | None = None) -> None:
    """A stage whose module has `add_args(parser)` and `run(args)` (imported when registered)."""
    import importlib

    mod = importlib.import_module(module)
    p = sub.add_parser(name, help=help, description=description or mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_args(p)
    p.set_defaults(func=mod.run)


def _train_parser(sub) -> None:
    """`train`: the train stage, handed its drafter's objective from the drafter registry."""
    import functools

    from draftsmith import drafters
    from draftsmith.train import loop

    names = ", ".join(f"{n} ({s.summary})" for n, s in drafters.REGISTRY.items())
    p = sub.add_parser("train", help="train a draft of any registered drafter (CPU, GPU, torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="One train loop for every drafter. `--recipe` names a shipped "
                                   "recipe (e.g. smollm2-135m/dspark) or a YAML path whose "
                                   "`drafter:` is one of: " + names + ". `--set a.b=v` overrides "
                                   "any key. Resumes from RUN/step_latest when present.")
    loop.add_args(p)
    p.set_defaults(func=functools.partial(loop.run, objective_for=drafters.objective_for))


MODULE_COMMANDS = (
    ("eval", "draftsmith.eval.commands", "lossless speculative decoding benchmarks: tau, acceptance, "
     "tokens/s against plain decoding, report with plots",
     "Runs plain decoding of the target (the speedup's denominator), each --draft and each baseline "
     "on the same prompts in one process; writes OUT/metrics.json and OUT/report.md."),
    ("calibrate", "draftsmith.eval.calibrate", "fit the confidence head's temperature scaling on "
     "held-out rounds and store it with the draft", None),
    ("export", "draftsmith.export.commands", "export a draft for DeepSpec, SGLang, vLLM/speculators or "
     "llama.cpp (GGUF), with a manifest", None),
    ("serve-check", "draftsmith.serve.check", "serve the draft in llama.cpp's llama-server and check "
     "that served tau matches offline tau (and the speedup)", None),
    ("quickstart", "draftsmith.quickstart", "the whole chain on the embedded default (what `make demo` "
     "runs)", "Runs every stage that exists on the embedded default target and writes a report."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftsmith", description="Train, evaluate, export and serve-check draft models for "
                                       "lossless speculative decoding.", epilog=STAGES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"draftsmith {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    _target_parser(sub)
    _data_parser(sub)
    _cache_parser(sub)
    _train_parser(sub)
    for name, module, help, description in MODULE_COMMANDS:
        _module_command(sub, name, module, help, description)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "no_progress", False):  # also the bars of loading the target
        from draftsmith.targets.model import set_load_progress

        set_load_progress(False)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"draftsmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("draftsmith: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""A prepared GPU check: one H100, under 8 minutes, offline, no model files.

    bench/gpu_check.sh [--device cuda|cpu] [--out FILE.json] [--steps N] [--skip-tests]

1. tests: tests/test_decoding.py (lossless decoding) and tests/test_models.py. No test takes a device:
   they run on the CPU, as a sanity step of the install.
2. training throughput of DSpark (shipped qwen3-4b/dspark recipe) and Eagle3 (smollm2-135m/eagle3
   on Qwen3-4B's layers [1, 17, 32], 7 TTT steps, 32000-token draft vocabulary) on a random-weight
   Qwen3-4B-geometry target in bf16 computing the features inside the step, on random tokens (the
   first eighth of each sequence is prompt), one micro-batch per optimizer step. A step is the
   loop's own `Trainer.train_step` (built by `loop.build_trainer`), timed through its lap hook with the device synchronized between phases: target features,
   collate (host copies, anchors), draft forward + loss, backward, optimizer (clip, AdamW,
   schedule). Warm-up steps excluded; peak = torch.cuda.max_memory_allocated (CPU: peak RSS).
3. lossless: greedy speculative output (SpecEngine; random DSpark and Eagle3 drafts, an oracle, and
   DSpark again with the target's static KV cache and torch.compile)
   equals target-only greedy output (HF generate) token for token, fp32 with TF32 off.

`--device cpu` runs it all at toy size. A time guard splits the 8-minute budget between the
sections; one that would overrun stops early or is skipped, and the output says so. Exit status:
0 passed, 1 a check failed (tests, a training error, a lossless mismatch), 3 lossless cut short.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3Config

from draftsmith.data.templates import RenderedSample
from draftsmith.drafters import build_objective
from draftsmith.models.dspark import DSparkConfig
from draftsmith.models.eagle3 import Eagle3Config
from draftsmith.models.io import build_draft
from draftsmith.decoding import DSparkProposer, Eagle3Proposer, OracleProposer, SpecEngine
from draftsmith.targets.model import TargetModel
from draftsmith.train import loop
from draftsmith.train.dataset import TrainData
from draftsmith.train.parallel import DistInfo
from draftsmith.train.recipe import load_recipe
from draftsmith.train.setup import Setup, build_model, feature_source
from draftsmith.utils.dtypes import resolve as resolve_dtype
from draftsmith.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_decoding.py", "tests/test_models.py"]
PHASES = ("features", "collate", "draft_fwd_loss", "backward", "optimizer")
RECIPES = {"dspark": "qwen3-4b/dspark", "eagle3": "smollm2-135m/eagle3"}
ROPE = {"rope_type": "default", "rope_theta": 1e6}
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=ROPE)
TOY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=64, vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False,
           rope_parameters=ROPE)
SMALL = dict(TOY, hidden_size=256, num_hidden_layers=6, head_dim=64, intermediate_size=512, vocab_size=12,
             max_position_embeddings=512)
LOSSLESS_LAYERS = [0, 1, 2]


@dataclass
class Plan:
    """Sizes of one run: full size on a GPU, toy size on the CPU."""

    geometry: dict  # the training target's Qwen3Config fields
    seq_len: int
    micro_batch: int
    steps: int  # measured steps, after `warmup` more
    warmup: int
    overrides: dict[str, list[str]]  # recipe `--set` overrides per drafter
    lossless_geometry: dict
    prompt_lengths: list[int]
    new_tokens: int
    draft_tokens: int  # DSpark block size, Eagle3 chain length, oracle tokens per round


def plan_for(device: torch.device, steps: int | None = None) -> Plan:
    gpu = device.type == "cuda"
    seq, mb, dtype = (2048, 4, "bf16") if gpu else (48, 2, "fp32")
    common = [f"train.micro_batch={mb}", f"train.global_batch={mb}", f"data.max_length={seq}",
              "features.mode=online", f"features.target_dtype={dtype}", f"train.precision={dtype}",
              "features.top_k=null"]  # online features: the exact p_t (a top-k p_t lives in a cache)
    eagle3 = common + ["features.batching=auto", "features.max_batch_tokens=4096", "train.recompute=true"]
    if gpu:
        return Plan(QWEN3_4B, seq, mb, steps or 8, 2, {"dspark": common, "eagle3": eagle3 + [
            "model.target_layer_ids=[1, 17, 32]", "model.ttt_length=7", "model.draft_vocab_size=32000"]},
            SMALL, [5, 2, 8, 17, 3, 30, 11, 24], 64, 6)
    dspark = common + ["model.num_hidden_layers=1", "model.block_size=3", "model.target_layer_ids=[0, 2]",
                       "model.num_anchors=8", "model.markov_rank=8", "model.mask_token_id=95", "train.loss_chunk=8"]
    eagle3 += ["model.target_layer_ids=[0, 1, 2]", "model.ttt_length=3", "model.draft_vocab_size=64",
               "train.loss_chunk=32"]
    return Plan(TOY, seq, mb, steps or 2, 1, {"dspark": dspark, "eagle3": eagle3}, dict(TOY, vocab_size=10),
                [5, 2, 8], 24, 4)


class Clock:
    """The time guard: one budget for the whole check, handed out as section deadlines."""

    def __init__(self, budget_s: float):
        self.t0, self.budget, self.notes = time.perf_counter(), budget_s, []

    def deadline(self, cap_s: float, reserve_s: float) -> float:
        """Now + at most cap_s, leaving reserve_s of the budget to the sections after this one."""
        left = self.budget - (time.perf_counter() - self.t0)
        return time.perf_counter() + max(0.0, min(cap_s, left - reserve_s))


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------- 1. tests


def run_tests(deadline: float, clock: Clock) -> dict:
    """pytest on TESTS in a subprocess, stopped at the deadline."""
    if not all((ROOT / t).is_file() for t in TESTS):
        return {"status": "skipped", "detail": "no tests/ next to this script"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        clock.notes.append("tests: stopped by the time guard before they finished")
        return {"status": "stopped (time guard)", "detail": " ".join(TESTS)}
    if "No module named pytest" in out.stderr:
        return {"status": "skipped", "detail": "pytest is not installed"}
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    last = lines[-1].strip("= ") if lines else out.stderr.strip()[-300:]
    return {"status": "passed" if out.returncode == 0 else "FAILED",
            "detail": f"{last} ({' '.join(TESTS)}; on the CPU: no test takes a device)",
            "output_tail": "" if out.returncode == 0 else (out.stdout + out.stderr)[-3000:]}


# --------------------------------------------------------------------------- 2. training


def random_target(geometry: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight Qwen3 causal LM, created directly on `device` (no download)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(Qwen3Config(**geometry), dtype=dtype).eval()


def random_samples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Random token sequences as rendered samples; the first eighth is prompt (loss mask 0)."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, seq_len // 8)
    return [RenderedSample(f"r{i}", torch.randint(0, vocab, (seq_len,), generator=g, device="cpu").tolist(),
                           [0] * prompt + [1] * (seq_len - prompt)) for i in range(n)]


def make_setup(drafter: str, plan: Plan, device: torch.device, seed: int = 0):
    """(Setup, Recipe) as `train.setup.build_setup` makes them, with a random target and random
    data in place of a target path and a data file (draft, taps, online features: the project's)."""
    recipe = load_recipe(RECIPES[drafter], plan.overrides[drafter])
    target_dtype = resolve_dtype(recipe.features.target_dtype, device)
    hf = random_target(plan.geometry, target_dtype.torch, device, seed)
    n = recipe.train.global_batch * (plan.steps + plan.warmup)
    data = TrainData(random_samples(n, plan.seq_len, plan.geometry["vocab_size"], seed), [])
    torch.manual_seed(seed)
    model = build_model(recipe, hf, data, None)
    target = TargetModel(hf, list(model.config.target_layer_ids)).to(device)
    features = feature_source(recipe, target, data, DistInfo(device=device), None, None, False)
    return Setup(target, None, data, model.to(device), features, target_dtype,
                 resolve_dtype(recipe.train.precision, device)), recipe


class Laps:
    """Seconds per phase, the device synchronized at each lap."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, dict.fromkeys(PHASES, 0.0)
        self.start = self.last = sync(device)

    def lap(self, phase: str) -> None:
        now = sync(self.device)
        self.t[phase] += now - self.last
        self.last = now


def timed_step(step: int, trainer: loop.Trainer, device: torch.device) -> dict:
    """One optimizer step of the loop's own `Trainer` (`train_step`: features, collate, forward,
    backward, clip, AdamW, schedule), timed phase by phase through its `lap` hook."""
    laps = Laps(device)
    acc = trainer.train_step(step, lap=laps.lap)
    m = trainer.reduce(acc)
    plan = loop.step_samples(step, len(trainer.s.data.train), trainer.recipe.train.global_batch,
                             trainer.recipe.train.seed)
    tokens = sum(len(trainer.s.data.train[j].input_ids) for j, _ in plan)
    return {"phases": laps.t, "blocks": m["blocks"], "slots": m["tokens"], "tokens": tokens, "loss": m["loss"],
            "wall": laps.last - laps.start}


def train_section(drafter: str, plan: Plan, device: torch.device, deadline: float, clock: Clock) -> dict:
    """Warm-up + measured steps of one drafter, stopped early at the deadline."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    s, recipe = make_setup(drafter, plan, device)
    total = plan.warmup + plan.steps
    trainer = loop.build_trainer(recipe, s, DistInfo(device=device), build_objective, total, prefetch=False)
    row = {"drafter": drafter, "recipe": RECIPES[drafter], "overrides": plan.overrides[drafter], "status": "ok",
           "setup_s": time.perf_counter() - t0,
           "γ": getattr(s.model.config, "block_size", None) or s.model.config.ttt_length,
           "trainable_M": sum(p.numel() for p in trainer.params) / 1e6}
    measured, last = [], 0.0
    for step in range(total):
        if time.perf_counter() + last > deadline:
            row["status"] = f"stopped (time guard) after {step} of {total} steps"
            clock.notes.append(f"train {drafter}: {row['status']}")
            break
        r = timed_step(step, trainer, device)
        last = r["wall"]
        if step >= plan.warmup:
            measured.append(r)
    return {**row, **throughput(measured, plan, device)}


def throughput(measured: list[dict], plan: Plan, device: torch.device) -> dict:
    """Rates over the measured steps, mean phase times, peak memory."""
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    out = {"steps": len(measured), "warmup": plan.warmup, "seq_len": plan.seq_len,
           "micro_batch": plan.micro_batch, "peak_gib": peak / 2**30, "peak_kind": kind}
    if measured:
        wall, n = sum(r["wall"] for r in measured), len(measured)
        out.update({f"{k}_per_s": sum(r[k] for r in measured) / wall for k in ("blocks", "tokens", "slots")},
                   s_per_step=wall / n, loss_first=measured[0]["loss"], loss_last=measured[-1]["loss"],
                   phases_ms={k: 1e3 * sum(r["phases"][k] for r in measured) / n for k in PHASES})
    return out


# --------------------------------------------------------------------------- 3. lossless


def first_mismatch(want: list[list[int]], got: list[list[int]], complete: bool = True) -> dict | None:
    """The first token where `got` differs from `want` (None: equal). `complete=False`: `got`
    may stop early (a run cut by the time guard), so only its prefix is compared."""
    if len(want) != len(got):
        return {"prompt": min(len(want), len(got)), "index": 0, "want": None, "got": None}
    for r, (w, g) in enumerate(zip(want, got)):
        n = min(len(w), len(g))
        i = next((i for i in range(n) if w[i] != g[i]), n)
        if i < n or len(g) > len(w) or (complete and len(g) < len(w)):
            return {"prompt": r, "index": i, "want": w[i] if i < len(w) else None,
                    "got": g[i] if i < len(g) else None}
    return None


@torch.no_grad()
def greedy_reference(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Target-only greedy continuations, one prompt at a time (HF generate, no EOS)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=hf.device)  # an explicit mask: generate would mask pad ids
        out.append(hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
    return out


@torch.no_grad()
def top2_gap(hf, tokens: list[int]) -> float:
    """The target's top-1 minus top-2 logit after `tokens` (near 0: a numerical near-tie)."""
    top = hf(torch.tensor([tokens], device=hf.device)).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def lossless_proposers(hf, refs: list[list[int]], plan: Plan, seed: int = 1):
    """(name, proposer, engine options): random DSpark and Eagle3 drafts, an oracle of the
    reference, and the DSpark draft again with the target's static KV cache and torch.compile
    (compile is a logged no-op off CUDA)."""
    V, k = hf.config.vocab_size, plan.draft_tokens
    torch.manual_seed(seed)
    cfg = DSparkConfig.from_target(hf.config, mask_token_id=V - 1, num_hidden_layers=2, markov_rank=8,
                                   target_layer_ids=LOSSLESS_LAYERS, block_size=k)
    dspark = build_draft(cfg).init_from_target(hf).float().to(hf.device)
    yield "dspark", DSparkProposer(dspark), {}
    cfg = Eagle3Config.from_target(hf.config, target_layer_ids=LOSSLESS_LAYERS)
    yield "eagle3", Eagle3Proposer(build_draft(cfg).init_from_target(hf).float().to(hf.device), num_tokens=k), {}
    yield "oracle", OracleProposer(refs, num_tokens=k), {}
    yield "dspark, static KV + compile", DSparkProposer(dspark), {"static_kv": True, "compile": True}


def lossless_section(plan: Plan, device: torch.device, deadline: float, clock: Clock) -> list[dict]:
    """Greedy speculative output against target-only greedy output, per proposer, in fp32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf = random_target(plan.lossless_geometry, torch.float32, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, hf.config.vocab_size - 1, (n,), generator=g, device="cpu").tolist()
               for n in plan.prompt_lengths]
    refs, target, rows = greedy_reference(hf, prompts, plan.new_tokens), TargetModel(hf, LOSSLESS_LAYERS), []
    for name, proposer, options in lossless_proposers(hf, refs, plan):
        row = {"draft": name, "prompts": len(prompts), "new_tokens": plan.new_tokens, "status": "pass"}
        rows.append(row)
        if time.perf_counter() >= deadline:
            clock.notes.append(f"lossless {name}: skipped by the time guard")
            row["status"] = "skipped (time guard)"
            continue
        run = SpecEngine(target, proposer, **options).start(prompts, plan.new_tokens)
        while not run.done and time.perf_counter() < deadline:
            run.step()
        out = run.result()
        row.update(tau=out.summary()["tau"], accepted=sum(a for r in out.rounds for a in r.accepted),
                   rejected=sum(a < p for r in out.rounds for a, p in zip(r.accepted, r.proposed)))
        bad = first_mismatch(refs, out.outputs, complete=run.done)
        if bad:
            r = bad["prompt"]
            bad["target_top2_gap"] = top2_gap(hf, prompts[r] + refs[r][:bad["index"]]) if r < len(refs) else None
            row.update(status="MISMATCH", mismatch=bad)
        elif not run.done:
            clock.notes.append(f"lossless {name}: cut by the time guard (the tokens made so far match)")
            row["status"] = "partial (time guard)"
    return rows


# --------------------------------------------------------------------------- report and main


def _f(x, spec: str = ".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rep: dict) -> str:
    d = rep["dtype"]
    lines = [f"## draftsmith GPU check — {rep['device']} ({rep['device_name']})", "",
             f"torch {rep['torch']} · transformers {rep['transformers']} · training: {d['train_target']} "
             f"target, {d['train_draft']} draft · lossless: {d['lossless']} · budget {rep['budget_s']:.0f} s, "
             f"elapsed {rep['elapsed_s']:.0f} s", "", "| section | status | s | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {_f(s['seconds'])} | {s['detail']} |" for s in rep["sections"]]
    lines += ["", f"### training throughput — {rep['train_target']}, online features", "",
              "| drafter | γ | steps | seq × batch | anchor-blocks/s | tokens/s | slots/s | s/step | peak GiB | "
              + " | ".join(f"{k} ms" for k in PHASES) + " |", "|---|" + "---:|" * 2 + "---|" + "---:|" * 10]
    for r in rep["train"]:
        ph = r.get("phases_ms", {})
        cells = [r["drafter"], r.get("γ", "–"), r.get("steps", 0),
                 f"{r.get('seq_len', '–')} × {r.get('micro_batch', '–')}",
                 _f(r.get("blocks_per_s")), _f(r.get("tokens_per_s"), ".0f"), _f(r.get("slots_per_s"), ".0f"),
                 _f(r.get("s_per_step"), ".3f"), _f(r.get("peak_gib"), ".2f"), *(_f(ph.get(k)) for k in PHASES)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"### lossless greedy — {rep['lossless_target']}", "",
              "| draft | prompts × new tokens | accepted | rejected | τ | status |", "|---|---|---:|---:|---:|---|"]
    for r in rep["lossless"]:
        status = f"{r['status']} {json.dumps(r['mismatch'])}" if "mismatch" in r else r["status"]
        lines.append(f"| {r['draft']} | {r['prompts']} × {r['new_tokens']} | {r.get('accepted', '–')} | "
                     f"{r.get('rejected', '–')} | {_f(r.get('tau'), '.2f')} | {status} |")
    guard = "; ".join(rep["time_guard"]) or "no section needed it"
    return "\n".join(lines + ["", f"time guard: {guard}", f"result: {rep['result']}"])


def header(device: torch.device, plan: Plan, budget_s: float) -> dict:
    gpu = device.type == "cuda"
    geo = lambda g: (f"random Qwen3 (hidden {g['hidden_size']}, {g['num_hidden_layers']} layers, "  # noqa: E731
                     f"{g['num_attention_heads']}/{g['num_key_value_heads']} heads, vocab {g['vocab_size']})")
    return {"device": device.type, "device_name": torch.cuda.get_device_name(device) if gpu
            else (platform.processor() or "cpu"), "torch": torch.__version__,
            "transformers": transformers.__version__, "budget_s": budget_s,
            "dtype": {"train_target": "bf16" if gpu else "fp32", "lossless": "fp32 (TF32 off)",
                      "train_draft": "bf16 autocast, fp32 master weights" if gpu else "fp32"},
            "train_target": geo(plan.geometry), "lossless_target": geo(plan.lossless_geometry),
            "sections": [], "train": [], "lossless": []}


def guarded(name: str, fn, device: torch.device) -> dict:
    """fn() -> a section's result; an exception (an OOM, a bug) is reported and the check goes on."""
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001
        res = {"status": f"ERROR {type(e).__name__}: {str(e)[:300]}"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "seconds": time.perf_counter() - t0, "detail": "", **res}


def run_sections(args, device: torch.device, plan: Plan, clock: Clock, rep: dict) -> None:
    """Tests, training, lossless, each under its share of the budget (cap, reserve for the rest)."""
    tests = (lambda: {"status": "skipped", "detail": "--skip-tests"}) if args.skip_tests else \
        (lambda: run_tests(clock.deadline(180, 200), clock))
    rep["sections"].append(guarded("tests", tests, device))
    for drafter, reserve in (("dspark", 100), ("eagle3", 40)):
        def train(drafter=drafter, deadline=clock.deadline(150, reserve)):
            if deadline <= time.perf_counter():
                clock.notes.append(f"train {drafter}: skipped by the time guard")
                return {"status": "skipped (time guard)"}
            return train_section(drafter, plan, device, deadline, clock)

        sec = guarded(f"train {drafter}", train, device)
        rep["train"].append({"drafter": drafter, **{k: v for k, v in sec.items() if k not in ("name", "seconds")}})
        sec["detail"] = f"{sec['steps']} steps after {sec['warmup']} warm-up" if "steps" in sec else ""
        rep["sections"].append({k: sec[k] for k in ("name", "status", "seconds", "detail")})

    def lossless():
        rep["lossless"] = lossless_section(plan, device, clock.deadline(600, 0), clock)
        st = {r["status"] for r in rep["lossless"]}
        return {"status": "MISMATCH" if "MISMATCH" in st else "pass" if st == {"pass"} else "incomplete",
                "detail": "greedy speculative == target-only greedy, token for token"}

    rep["sections"].append(guarded("lossless", lossless, device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the report as JSON to this file")
    p.add_argument("--steps", type=int, help="measured training steps (default: 8 on cuda, 2 on cpu)")
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest section")
    p.add_argument("--budget-s", type=float, default=480.0, help="time guard for the whole check (8 minutes)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (--device cpu runs the toy size)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # toy shapes: thread hand-offs cost more than they save
    plan, clock = plan_for(device, args.steps), Clock(args.budget_s)
    rep = header(device, plan, args.budget_s)
    run_sections(args, device, plan, clock, rep)
    failed = [s["name"] for s in rep["sections"] if s["status"].startswith(("FAILED", "ERROR", "MISMATCH"))]
    incomplete = rep["sections"][-1]["status"] == "incomplete"
    rep.update(elapsed_s=time.perf_counter() - clock.t0, time_guard=clock.notes,
               result=f"FAILED: {', '.join(failed)}" if failed else "incomplete (time guard)" if incomplete else "ok")
    print(markdown(rep), flush=True)
    if args.out:
        atomic_write_json(args.out, rep)
    return 1 if failed else 3 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())

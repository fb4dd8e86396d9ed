"""Does the DSpark context path carry what it should? (issue 14, step 0)

Two measurements on the embedded SmolLM2 target and the shared regenerated answers:

- `--probe`: a ridge-regression linear probe from the target features at position t (what a
  block may read as context) to the target's normed last hidden at t, scored like training
  (held-out c* = 1 − ½‖p_probe − p_t‖₁ through the frozen LM head). It tells how much of p_t is
  linearly decodable from the features at all.
- training runs of the `smollm2-135m/dspark` recipe (small: `--records`, `--steps`) with a
  *leak*: the block may read the anchor's own features (`j <= anchor` instead of `j < anchor`),
  which the probe shows nearly determine slot 0's label. A context path that works lets slot 0's
  held-out c* rise far above slots 1..γ-1. Variants: `--init-target` (draft layers copied from
  the target's last layers, fc selecting the last tapped layer, norms from the target) and
  `--fc-rms` (fc's columns scaled by 1/RMS of each feature dimension: SmolLM2's features carry
  a few dimensions ~100x the median RMS that dominate a randomly initialized fc).

The leak and the variants are applied by patching `models.dspark` / `train.setup` in this
process only; nothing here changes the package. Prints the per-slot held-out c* curve.

    .venv/bin/python bench/context_leak.py --probe
    .venv/bin/python bench/context_leak.py --leak --out /tmp/leak [--init-target | --fc-rms]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

DATA = "../shared/data/sharegpt-smollm2-regen.jsonl"


def patch_leak() -> None:
    """Blocks read the context up to and including their anchor (training forward only)."""
    import draftsmith.models.dspark as ds

    mask = ds.block_attention_mask
    ds.block_attention_mask = lambda a, valid, n, g: mask(a + 1, valid, n, g)  # j < a+1  <=>  j <= a
    blocks, forward = ds.DSparkModel._blocks, ds.DSparkModel.forward

    def leak_blocks(self, features, input_ids, anchors, keep):
        return blocks(self, self._leak_features[:, : int(anchors.max()) + 1], input_ids, anchors, keep)

    def leak_forward(self, features, *args, **kwargs):
        self._leak_features = features
        return forward(self, features, *args, **kwargs)

    ds.DSparkModel._blocks, ds.DSparkModel.forward = leak_blocks, leak_forward


def patch_direct() -> None:
    """The leak without attention: slot 0's input is its anchor's own context row
    hidden_norm(fc(features[anchor])) added to the anchor token's embedding (training forward
    only). Isolates fc / norms / layers / head from attention's search over the context."""
    import draftsmith.models.dspark as ds

    blocks, forward, embed = ds.DSparkModel._blocks, ds.DSparkModel.forward, ds.DSparkModel.embed

    def direct_blocks(self, features, input_ids, anchors, keep):
        rows = self._leak_features.gather(1, anchors[..., None].expand(-1, -1, self._leak_features.shape[-1]))
        self._direct = self.project_context(rows)  # [B, N, L·H] -> [B, N, H]
        try:
            return blocks(self, features, input_ids, anchors, keep)
        finally:
            self._direct = None

    def direct_embed(self, ids):
        e = embed(self, ids)
        if getattr(self, "_direct", None) is not None and ids.dim() == 3:  # [B, N, γ] training blocks
            e = e.clone()
            e[..., 0, :] = e[..., 0, :] + self._direct.to(e.dtype)
        return e

    def leak_forward(self, features, *args, **kwargs):
        self._leak_features = features
        return forward(self, features, *args, **kwargs)

    ds.DSparkModel._blocks, ds.DSparkModel.forward = direct_blocks, leak_forward
    ds.DSparkModel.embed = direct_embed


def patch_init(init_target: bool, fc_rms: bool, norm_from_target: bool = False) -> None:
    """Wrap train.setup.build_model with the chosen initialization."""
    import draftsmith.train.setup as setup
    from draftsmith.features.online import compute_features
    from draftsmith.targets.model import TargetModel

    build = setup.build_model

    @torch.no_grad()
    def build_model(recipe, hf, data, init_from):
        m = build(recipe, hf, data, init_from)
        H, ids = m.config.hidden_size, list(m.config.target_layer_ids)
        if init_target:
            L, n = len(hf.model.layers), len(m.layers)
            for i, layer in enumerate(m.layers):  # q_norm / k_norm (absent in Llama) stay at 1
                layer.load_state_dict(hf.model.layers[L - n + i].state_dict(), strict=False)
            j = ids.index(L - n - 1) if (L - n - 1) in ids else len(ids) - 1
            m.fc.weight.mul_(0.1)
            m.fc.weight[:, j * H:(j + 1) * H] += torch.eye(H)
            m.hidden_norm.weight.copy_(hf.model.layers[L - n].input_layernorm.weight)
            m.norm.weight.copy_(hf.model.norm.weight)
        if norm_from_target:  # the target's logit scale from step 0 (its final norm weight)
            m.norm.weight.copy_(hf.model.norm.weight)
        if fc_rms:
            feats = compute_features(TargetModel(hf, ids, None), data.train[:16])
            x = torch.cat([f.features[1:].float() for f in feats])  # position 0 is a sink
            inv = 1 / x.pow(2).mean(0).sqrt().clamp_min(1e-3)  # [L·H]
            m.fc.weight.mul_((inv / inv.mean())[None, :])
        return m

    setup.build_model = build_model


def run_training(args) -> None:
    from draftsmith.drafters import train
    from draftsmith.train.metrics import read_metrics
    from draftsmith.train.recipe import load_recipe

    if args.leak:
        patch_leak()
    if args.direct:
        patch_direct()
    patch_init(args.init_target, args.fc_rms, args.norm_from_target)
    sets = [f"data.limit={args.records}", "data.heldout_fraction=0.1", "data.max_heldout=24",
            "init.final_norm=1.0", f"train.max_steps={args.steps}", "train.eval_every=25",
            "train.checkpoint_every=100000", *args.set]
    t0 = time.time()
    train(load_recipe("smollm2-135m/dspark", sets), args.data, args.out, resume=False, progress=False)
    print("step  tau_sim  held-out c* per slot")
    for m in read_metrics(args.out):
        if "eval/tau_sim" in m:
            print(f"{m['step']:>4}  {m['eval/tau_sim']:.3f}   {m['eval/c_star']}")
    print(f"{time.time() - t0:.0f} s; leak={args.leak} direct={args.direct} init_target={args.init_target} fc_rms={args.fc_rms}")


@torch.no_grad()
def run_probe(args) -> None:
    from draftsmith.data.templates import render_records
    from draftsmith.features.online import compute_features
    from draftsmith.targets.model import load_target, load_tokenizer

    layers = [1, 8, 14, 21, 27]  # the smollm2-135m/dspark recipe's
    t = load_target("smollm2-135m", layers, torch.float32)
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in itertools.islice(f, args.records)]
    samples, _ = render_records(load_tokenizer(t.source), records, 512, {}, total=len(records), progress=False)
    xs, prev, toks, ys = [], [], [], []
    for s in compute_features(t, samples):
        mask = torch.as_tensor(s.loss_mask).bool()
        idx = torch.nonzero(mask[2:]).squeeze(1) + 1  # hidden[t] gives p_t of token t + 1 (supervised)
        xs.append(s.features[idx].float())
        prev.append(s.features[idx - 1].float())
        toks.append(torch.as_tensor(s.input_ids)[idx])
        ys.append(s.hidden[idx].float())
    x, xp, y = torch.cat(xs), torch.cat(prev), torch.cat(ys)
    head, H = t.model.lm_head.weight.float(), t.model.config.hidden_size
    emb = t.model.get_input_embeddings().weight.float()[torch.cat(toks)]  # the anchor token's embedding
    print(f"{len(x)} supervised positions, first 80 % fit, last 20 % scored")
    for name, feats in (("all tapped layers at t (the leak)", x), ("last tapped layer at t", x[:, -H:]),
                        ("all tapped layers at t-1 (no anchor token)", xp),
                        ("t-1 layers + the anchor token's embedding (what slot 0 reads; linear)",
                         torch.cat([xp, emb], 1)),
                        ("the anchor token's embedding alone (a linear bigram)", emb)):
        print(f"{name}: held-out c* {_probe(feats, y, head):.3f}")


def _probe(x: torch.Tensor, y: torch.Tensor, head: torch.Tensor, ridge: float = 10.0) -> float:
    n = int(0.8 * len(x))
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-4
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], dim=1)  # standardized + bias
    a = torch.linalg.solve(z[:n].T @ z[:n] + ridge * torch.eye(z.shape[1]), z[:n].T @ y[:n])
    p_t, p = F.softmax(y[n:] @ head.T, -1), F.softmax((z[n:] @ a) @ head.T, -1)
    return float((1 - 0.5 * (p_t - p).abs().sum(-1)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="store_true", help="the linear probe instead of a training run")
    p.add_argument("--leak", action="store_true")
    p.add_argument("--direct", action="store_true", help="slot 0 gets its anchor's context row added to its "
                   "input (the leak without attention)")
    p.add_argument("--init-target", action="store_true")
    p.add_argument("--fc-rms", action="store_true")
    p.add_argument("--norm-from-target", action="store_true", help="the draft's final norm weight copied "
                   "from the target's (the target's logit scale from the first step)")
    p.add_argument("--data", default=DATA)
    p.add_argument("--records", type=int, default=224, help="records read (probe: 40 is plenty)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="/tmp/context-leak")
    p.add_argument("--set", action="append", default=[], help="more recipe overrides")
    args = p.parse_args()
    run_probe(args) if args.probe else run_training(args)


if __name__ == "__main__":
    main()

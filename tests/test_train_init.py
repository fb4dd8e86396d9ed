"""Data-dependent inits (train/init.py): the Markov head from the training labels' bigrams."""

import pytest
import torch
from tiny_targets import tiny_target

from draftsmith.data.templates import RenderedSample
from draftsmith.models.dspark import DSparkConfig, build_dspark
from draftsmith.train.init import bigram_pairs, init_markov_from_bigrams
from draftsmith.utils.io import InputError


def cyclic_samples(n=40, length=30, cycle=(10, 11, 12, 13, 14, 15, 16, 17)):
    """Responses in which token c always follows token c - 1 (cyclically), after a prompt token 90."""
    out = []
    for i in range(n):
        ids = [90] + [cycle[(i + t) % len(cycle)] for t in range(length)]
        out.append(RenderedSample(f"s{i}", ids, [0] + [1] * length))
    return out


def draft(target, **kw):
    cfg = DSparkConfig.from_target(target.config, mask_token_id=5, num_hidden_layers=1, markov_rank=8,
                                   target_layer_ids=[1], block_size=3, **kw)
    return build_dspark(cfg).init_from_target(target, kw.get("_kept"))


def test_bigram_pairs_skip_unsupervised_and_pruned_labels():
    samples = [RenderedSample("a", [1, 2, 3, 4], [0, 0, 1, 1])]
    prev, nxt = bigram_pairs(samples, 96, None)
    assert prev.tolist() == [2, 3] and nxt.tolist() == [3, 4]  # labels 3 and 4 are supervised
    prev, nxt = bigram_pairs(samples, 96, torch.tensor([0, 4, 7]))  # draft vocab {0, 4, 7}
    assert prev.tolist() == [3] and nxt.tolist() == [1]  # 4 is draft id 1; 3 is not in the vocab


@pytest.mark.parametrize("pruned", [False, True])
def test_markov_head_starts_as_the_bigram(pruned):
    target = tiny_target("qwen3")
    samples = cyclic_samples()
    if pruned:
        cfg = DSparkConfig.from_target(target.config, mask_token_id=5, num_hidden_layers=1, markov_rank=8,
                                       target_layer_ids=[1], block_size=3, draft_vocab_size=24)
        kept = torch.arange(24)  # the cycle's tokens 10..17 sit inside the draft vocabulary
        model = build_dspark(cfg).init_from_target(target, kept)
    else:
        model = draft(target)
    line = init_markov_from_bigrams(model, samples)
    assert "9 distinct previous tokens" in line  # 10..17 and the prompt token 90
    prev = torch.arange(10, 18)
    with torch.no_grad():
        bias = model.markov_head.step(torch.zeros(8, 32), prev)[0]  # [8, V_draft]
    best = model.to_target_ids(bias.argmax(-1))
    assert best.tolist() == [11, 12, 13, 14, 15, 16, 17, 10]
    probs = torch.softmax(bias, -1)
    assert float(probs[torch.arange(8), bias.argmax(-1)].min()) > 0.5  # a sharp prior, not a tie
    assert model.markov_head.markov_w1.weight[50].abs().sum() == 0  # never a previous token: no bias


def test_bigram_init_refuses_heads_it_cannot_set():
    target = tiny_target("qwen3")
    with pytest.raises(InputError, match="vanilla Markov head"):
        init_markov_from_bigrams(draft(target, markov_head_type="gated"), cyclic_samples())
    with pytest.raises(InputError, match="no supervised label pairs"):
        init_markov_from_bigrams(draft(target), [RenderedSample("x", [1, 2], [0, 0])])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_final_norm_target_takes_the_targets_logit_scale(family):
    """init.final_norm=target: the draft's final norm computes what the target's does (Gemma's
    norm stores w and scales by 1 + w; Llama/Qwen3 scale by w)."""
    from draftsmith.train.dataset import TrainData
    from draftsmith.train.recipe import Recipe
    from draftsmith.train.setup import build_model

    target = tiny_target(family)
    with torch.no_grad():  # a non-trivial scale (random inits leave it at 1)
        target.get_decoder().norm.weight.uniform_(0.5, 3.0)
    model = {"mask_token_id": 5, "num_hidden_layers": 1, "target_layer_ids": [1], "block_size": 3, "markov_rank": 0,
             "confidence_head_with_markov": False}
    x = torch.randn(7, target.config.hidden_size)
    data = TrainData([RenderedSample("a", [1, 2, 3], [0, 1, 1])], [])
    want = target.get_decoder().norm(x)
    for final_norm, same in (("target", True), (1.0, False)):  # 1.0: the negative control
        recipe = Recipe(drafter="dspark", model=model, init={"final_norm": final_norm})
        draft_model = build_model(recipe, target, data, None)
        got = draft_model.norm(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) == same, (family, final_norm)
    with pytest.raises(ValueError, match="final_norm"):
        Recipe(drafter="dspark", model=model, init={"final_norm": 0})


def _causal_update(model, rows):
    """What the draft's first layer, run causally over `rows` [1, S, H] as its own tokens, adds to
    them (its output minus its input) -> [1, S, H]."""
    S = rows.shape[1]
    pos = torch.arange(S)[None]
    cos, sin = model.rotary(pos, rows.dtype)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None]  # [1, 1, S, S]
    return model.layers[0](rows, cos, sin, mask) - rows


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_layers_from_target_start_as_the_targets_last_layer(family):
    """init.layers=target: a one-layer draft holds a copy of the target's last layer, fc picks the
    output of the layer before it, hidden_norm is that layer's input norm. Run over the target's own
    layer-2 output, the draft layer adds what the target's layer 3 adds (Qwen3: exactly, it has q/k
    norms; Llama: the draft's q/k norms start at the target's typical q/k scale, so nearly); a
    random backbone, the negative control, does not."""
    from draftsmith.train.dataset import TrainData
    from draftsmith.train.recipe import Recipe
    from draftsmith.train.setup import build_model

    target = tiny_target(family)
    ids = torch.randint(0, 96, (1, 40))
    seen = {}
    hook = target.get_decoder().layers[3].register_forward_hook(
        lambda _m, _i, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = target(input_ids=ids, output_hidden_states=True)
    hook.remove()
    h2 = out.hidden_states[3]  # output of target layer 2 = input of layer 3, the last
    want_update = seen["out"] - h2
    features = torch.cat([out.hidden_states[1], h2], -1)  # target_layer_ids [0, 2]
    model_cfg = {"mask_token_id": 5, "num_hidden_layers": 1, "target_layer_ids": [0, 2], "block_size": 3,
                 "markov_rank": 0, "confidence_head_with_markov": False}
    data = TrainData([RenderedSample("a", ids[0].tolist(), [0] + [1] * 39)], [])
    cos = {}
    for layers in ("target", "random"):
        recipe = Recipe(drafter="dspark", model=model_cfg, init={"layers": layers})
        model = build_model(recipe, target, data, None)
        with torch.no_grad():
            if layers == "target":
                assert torch.equal(model.fc(features), h2)  # fc reads layer 2 only
                want = target.get_decoder().layers[3].input_layernorm(h2)
                assert torch.allclose(model.project_context(features), want, atol=1e-5)
            update = _causal_update(model, h2)
        cos[layers] = float(torch.nn.functional.cosine_similarity(update.flatten(), want_update.flatten(), 0))
        if layers == "target" and family == "qwen3":
            assert torch.allclose(update, want_update, atol=1e-5)
    assert cos["target"] > (0.999 if family == "qwen3" else 0.9), cos
    assert abs(cos["random"]) < 0.3, cos


def test_layers_from_target_need_the_input_layer_tapped():
    from draftsmith.train.dataset import TrainData
    from draftsmith.train.recipe import Recipe
    from draftsmith.train.setup import build_model

    target = tiny_target("qwen3")
    data = TrainData([RenderedSample("a", [1, 2, 3], [0, 1, 1])], [])
    model_cfg = {"mask_token_id": 5, "num_hidden_layers": 1, "target_layer_ids": [1], "block_size": 3, "markov_rank": 0,
                 "confidence_head_with_markov": False}
    recipe = Recipe(drafter="dspark", model={**model_cfg, "target_layer_ids": [1]}, init={"layers": "target"})
    build_model(recipe, target, data, None)  # layer 2, the copied layer's input, is not tapped: fc reads 1
    assert "fc reads target layer 1; target layers 2..2 skipped" in data.lines[-1]
    two = {**model_cfg, "num_hidden_layers": 2, "target_layer_ids": [2]}  # copies layers 2, 3
    recipe = Recipe(drafter="dspark", model=two, init={"layers": "target"})
    with pytest.raises(InputError, match="a layer below 2"):
        build_model(recipe, target, data, None)
    recipe = Recipe(drafter="eagle3", model={"target_layer_ids": [0, 1, 2]}, init={"layers": "target"})
    with pytest.raises(InputError, match="DSpark or DFlash"):
        build_model(recipe, target, data, None)
    gemma = tiny_target("gemma")
    recipe = Recipe(drafter="dspark", model={**model_cfg, "target_layer_ids": [2]}, init={"layers": "target"})
    with pytest.raises(InputError, match="Gemma"):
        build_model(recipe, gemma, data, None)

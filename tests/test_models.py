"""Draft architectures: masks, shapes, frozen parts, inference = training, draft dirs, vocab."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from tiny_targets import tiny_config, tiny_target

from draftsmith.models.dflash import DFlashConfig, build_dflash
from draftsmith.models.dspark import (
    DSparkConfig,
    block_attention_mask,
    block_labels,
    block_prev_tokens,
    build_dspark,
    default_dspark_layers,
)
from draftsmith.models.eagle3 import (
    Eagle3Config,
    Eagle3Model,
    default_eagle3_layers,
    ttt_attend,
    ttt_attention_mask,
    ttt_step_tokens,
)
from draftsmith.models.io import load_draft, save_draft
from draftsmith.models.layers import KVCache
from draftsmith.models.vocab import (
    build_draft_vocab,
    check_vocab_maps,
    draft_to_target,
    ids_from_d2t,
    scatter_draft_logits,
    target_to_draft,
)
from draftsmith.targets.model import TargetModel
from draftsmith.utils.io import InputError

FAMILIES = ["llama", "qwen3", "gemma"]
LAYERS = [0, 1, 2]  # tiny targets have 4 layers; 3 is the final one
V, H = 96, 32


def features_of(target, ids, layer_ids=LAYERS):
    out = TargetModel(target, layer_ids)(ids)
    return out.features, out.hidden


def perturb(model, std=0.3, seed=1):
    """Random non-trivial trainable weights (init is N(0, 0.02): too close to zero to test with)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                p.copy_(1 + noise if p.ndim == 1 and p.shape[0] in (H, 8) else noise)
    return model


def dspark(family="qwen3", seed=0, kept_ids=None, **kw):
    target = tiny_target(family, seed=seed)
    kw = {"mask_token_id": 5, "num_hidden_layers": 2, "markov_rank": 8, "target_layer_ids": LAYERS, **kw}
    cfg = DSparkConfig.from_target(target.config, **kw)
    return target, perturb(build_dspark(cfg).init_from_target(target, kept_ids))


def eagle3(family="llama", **kw):
    target = tiny_target(family)
    cfg = Eagle3Config.from_target(target.config, target_layer_ids=LAYERS, ttt_length=3, **kw)
    return target, perturb(Eagle3Model(cfg).init_from_target(target))


# --------------------------------------------------------------------------- masks


def brute_block_mask(anchors, valid, ctx_len, g):
    B, N = anchors.shape
    mask = torch.zeros(B, 1, N * g, ctx_len + N * g, dtype=torch.bool)
    for b in range(B):
        for q in range(N * g):
            n = q // g
            for k in range(ctx_len + N * g):
                if k < ctx_len:
                    mask[b, 0, q, k] = bool(valid[b, n]) and k < int(anchors[b, n])
                else:
                    mask[b, 0, q, k] = (k - ctx_len) // g == n
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_block_attention_mask_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, S, gamma = 2, 3, 9, 1 + seed
    anchors = torch.randint(0, S, (B, N), generator=g)
    valid = torch.rand(B, N, generator=g) > 0.3
    got = block_attention_mask(anchors, valid, S, gamma)
    assert torch.equal(got, brute_block_mask(anchors, valid, S, gamma))
    # the anchor's own position is never visible; positions just before it are
    a = int(anchors[0, 0])
    assert not got[0, 0, 0, a] and (a == 0 or bool(got[0, 0, 0, a - 1]) == bool(valid[0, 0]))


def test_ttt_attention_mask_matches_brute_force():
    S, step = 5, 2
    got = ttt_attention_mask(S, step)[0, 0]
    for i in range(S):
        for j in range((step + 1) * S):
            t, p = divmod(j, S)
            want = p <= i if t == 0 else p == i
            assert bool(got[i, j]) == want, (i, j)


@pytest.mark.parametrize("step", [1, 3])
def test_ttt_attend_equals_dense_masked_attention(step):
    """The training forward's TTT attention (causal block + one diagonal logit per later step)
    is the dense attention under ttt_attention_mask, gradients included (float64, GQA)."""
    _, model = eagle3("llama")
    attn = model.midlayer.self_attn.double()
    B, S, d = 2, 7, attn.head_dim
    g = torch.Generator().manual_seed(step)
    q = torch.randn(B, attn.num_heads, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    keys = [torch.randn(B, attn.num_kv_heads, S, d, generator=g, dtype=torch.float64) for _ in range(step + 1)]
    values = [torch.randn_like(k) for k in keys]
    got = ttt_attend(attn, q, keys, values)
    want = attn.attend(q, torch.cat(keys, 2), torch.cat(values, 2), ttt_attention_mask(S, step))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad_got,) = torch.autograd.grad(got.square().sum(), q)
    (grad_want,) = torch.autograd.grad(want.square().sum(), q)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-10, atol=1e-12)
    # negative control: a mask that also shows the later steps' keys of earlier positions differs
    leaky = ttt_attention_mask(S, step).clone()
    leaky[..., S:] = ttt_attention_mask(S, 0).expand(1, 1, S, S).repeat(1, 1, 1, step)
    other = attn.attend(q, torch.cat(keys, 2), torch.cat(values, 2), leaky)
    assert (other - got).abs().max() > 1e-3


def test_ttt_step_tokens_shift_and_pad():
    ids = torch.arange(10, 16)[None]
    tokens, valid = ttt_step_tokens(ids, 1)
    assert tokens.tolist() == [[12, 13, 14, 15, 0, 0]]
    assert valid.tolist() == [True, True, True, True, False, False]


# --------------------------------------------------------------------------- shapes, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_dspark_forward_shapes(family, head):
    target, model = dspark(family, markov_head_type=head)
    ids = torch.randint(0, V, (2, 12))
    feats, _ = features_of(target, ids)
    anchors = torch.tensor([[0, 3, 7, 10], [2, 5, 0, 0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    hidden = model(feats, ids, anchors, valid)
    assert hidden.shape == (2, 4, 7, H)
    assert torch.all(hidden[1, 2:] == 0) and torch.isfinite(hidden).all()
    labels, in_range = block_labels(ids, anchors, 7)
    prev = block_prev_tokens(ids, anchors, labels)
    assert model.draft_logits(hidden, prev).shape == (2, 4, 7, V)
    assert model.confidence(hidden, prev).shape == (2, 4, 7)
    assert in_range[0, 3].tolist() == [True] * 1 + [False] * 6  # anchor 10 of 12: only 11 exists


@pytest.mark.parametrize("family", FAMILIES)
def test_dflash_and_eagle3_forward_shapes(family):
    target = tiny_target(family)
    ids = torch.randint(0, V, (2, 10))
    feats, _ = features_of(target, ids)
    dcfg = DFlashConfig.from_target(target.config, mask_token_id=4, num_hidden_layers=1,
                                    target_layer_ids=LAYERS)
    dflash = build_dflash(dcfg).init_from_target(target)
    assert dflash.markov_head is None and dflash.confidence_head is None
    assert dflash(feats, ids, torch.tensor([[1, 4], [0, 8]])).shape == (2, 2, 7, H)
    _, model = eagle3(family)
    outs = model(feats, ids)
    assert len(outs) == 3 and all(o.shape == (2, 10, H) for o in outs)
    assert model.draft_logits(outs[-1]).shape == (2, 10, V)


def test_padded_anchors_do_not_change_valid_blocks():
    target, model = dspark()
    ids = torch.randint(0, V, (1, 12))
    feats, _ = features_of(target, ids)
    alone = model(feats, ids, torch.tensor([[6]]))
    padded = model(feats, ids, torch.tensor([[11, 6, 2]]), torch.tensor([[False, True, False]]))
    torch.testing.assert_close(padded[:, 1], alone[:, 0])
    assert torch.all(padded[:, [0, 2]] == 0)


def _grads_only_on_drafter(model, target, loss):
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert model.embed_tokens.weight.grad is None and not model.embed_tokens.weight.requires_grad
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"trainable without gradient: {missing}"


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_dspark_backward_touches_only_drafter(head):
    target, model = dspark(markov_head_type=head)
    ids = torch.randint(0, V, (2, 12))
    feats, _ = features_of(target, ids)
    anchors = torch.tensor([[1, 5], [3, 8]])
    hidden = model(feats, ids, anchors)
    labels, _ = block_labels(ids, anchors, 7)
    prev = block_prev_tokens(ids, anchors, labels)
    loss = model.draft_logits(hidden, prev).logsumexp(-1).mean() + model.confidence(hidden, prev).mean()
    _grads_only_on_drafter(model, target, loss)
    assert model.lm_head.weight.grad is None and not model.lm_head.weight.requires_grad


def test_eagle3_backward_trains_head_not_embedding():
    target, model = eagle3()
    ids = torch.randint(0, V, (2, 10))
    feats, _ = features_of(target, ids)
    loss = sum(model.draft_logits(h).logsumexp(-1).mean() for h in model(feats, ids))
    _grads_only_on_drafter(model, target, loss)
    assert model.lm_head.weight.grad is not None  # EAGLE-3 trains its draft head


# --------------------------------------------------------------------------- inference = training


@pytest.mark.parametrize("family,head", [("qwen3", "vanilla"), ("llama", "gated"),
                                         ("gemma", "rnn"), ("gemma", "vanilla")])
def test_dspark_propose_equals_training_forward(family, head):
    target, model = dspark(family, markov_head_type=head)
    model = model.double()
    ids = torch.randint(0, V, (1, 14))
    feats, _ = features_of(target.double(), ids)
    a = 6
    cache = model.new_cache()
    model.append_context(cache, feats[:, :2])
    model.append_context(cache, feats[:, 2:a])  # features of positions < anchor only
    prop = model.propose(cache, ids[:, a], a)
    hidden = model(feats, ids, torch.tensor([[3, a, 9]]))[:, 1]  # [1, γ, H]
    torch.testing.assert_close(prop.hidden, hidden, rtol=0, atol=1e-12)
    prev = torch.cat([ids[:, a:a + 1], prop.tokens[:, :-1]], dim=1)
    torch.testing.assert_close(prop.logits, model.draft_logits(hidden, prev), rtol=0, atol=1e-12)
    torch.testing.assert_close(prop.confidence_logits, model.confidence(hidden, prev), rtol=0, atol=1e-12)
    assert torch.equal(prop.tokens, prop.logits.argmax(-1))
    # rollback: drop positions >= 4, re-append the same features -> the same proposal
    cache.rollback(4)
    model.append_context(cache, feats[:, 4:a])
    torch.testing.assert_close(model.propose(cache, ids[:, a], a).hidden, prop.hidden, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_eagle3_propose_equals_ttt_steps(family):
    target, model = eagle3(family)
    model = model.double()
    ids = torch.randint(0, V, (1, 12))
    feats, _ = features_of(target.double(), ids)
    i, k = 5, 3
    cache = model.new_cache()
    model.extend(cache, feats[:, :2], ids[:, 1:3])
    prop = model.propose(cache, feats[:, 2:i + 1], ids[:, 3:i + 2], k)
    assert cache.length == i + 1  # chain entries rolled back
    forced = ids.clone()
    forced[0, i + 2:i + 1 + k] = prop.tokens[0, :k - 1]  # the TTT steps read the drafted tokens
    outs = model(feats, forced, ttt_length=k)
    for s in range(k):
        torch.testing.assert_close(prop.logits[:, s], model.draft_logits(outs[s][:, i]), rtol=0, atol=1e-12)


def test_kv_cache_grows_and_rolls_back():
    cache = KVCache(2)
    chunks = [torch.randn(1, 2, n, 4) for n in (3, 20, 5)]
    for c in chunks:
        for layer in range(2):
            cache.append(layer, c, -c)
    assert cache.length == 28
    cache.rollback(3)
    cache.append(0, chunks[2], -chunks[2])
    cache.append(1, chunks[2], -chunks[2])
    k, v = cache.get(1)
    assert torch.equal(k, torch.cat([chunks[0], chunks[2]], dim=2)) and torch.equal(v, -k)
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(99)


# --------------------------------------------------------------------------- draft dirs

DSPARK_NAMES_2_LAYERS = {
    "embed_tokens.weight", "norm.weight", "fc.weight", "hidden_norm.weight", "lm_head.weight",
    "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
    "confidence_head.proj.weight", "confidence_head.proj.bias",
} | {
    f"layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")
}


def test_dspark_dir_round_trip_names_and_keys(tmp_path):
    target, model = dspark()
    out = save_draft(model, tmp_path / "draft")
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == DSPARK_NAMES_2_LAYERS
    assert tensors["fc.weight"].shape == (H, 3 * H)
    assert tensors["markov_head.markov_w1.weight"].shape == (V, 8)
    assert tensors["confidence_head.proj.weight"].shape == (1, H + 8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["target_layer_ids"] == LAYERS and cfg["num_target_layers"] == 4
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["tie_word_embeddings"] is False
    assert cfg["markov_head_type"] == "vanilla" and cfg["confidence_head_with_markov"] is True
    assert "draft_vocab_size" not in cfg and cfg["draftsmith"]["kind"] == "dspark"
    loaded = load_draft(out)
    ids = torch.randint(0, V, (1, 10))
    feats, _ = features_of(target, ids)
    anchors = torch.tensor([[2, 6]])
    assert torch.equal(loaded(feats, ids, anchors), model(feats, ids, anchors))
    assert not loaded.embed_tokens.weight.requires_grad and not loaded.lm_head.weight.requires_grad


def test_dflash_dir_has_no_head_keys(tmp_path):
    target = tiny_target("qwen3")
    cfg = DFlashConfig.from_target(target.config, mask_token_id=4, num_hidden_layers=1)
    out = save_draft(build_dflash(cfg).init_from_target(target), tmp_path / "dflash")
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == ["Qwen3DSparkModel"] and data["markov_rank"] == 0
    assert data["enable_confidence_head"] is False
    assert "markov_head_type" not in data and "confidence_head_with_markov" not in data
    assert not any(k.startswith(("markov_head", "confidence_head"))
                   for k in load_file(str(out / "model.safetensors")))
    assert isinstance(load_draft(out).config, DFlashConfig)
    zlab = DFlashConfig.from_target(target.config, mask_token_id=4, slot_semantics="zlab")
    assert zlab.block_size == 16 and zlab.label_offset == 0
    zdir = save_draft(build_dflash(zlab), tmp_path / "zlab")
    assert json.loads((zdir / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]


def test_pruned_dspark_and_gemma_round_trip(tmp_path):
    vocab = build_draft_vocab(torch.arange(V), 40, always_include=[0, 1, 2])
    target, model = dspark("gemma", kept_ids=vocab.kept_ids, draft_vocab_size=40)
    assert torch.equal(model.lm_head.weight, target.lm_head.weight[vocab.kept_ids])
    out = save_draft(model, tmp_path / "pruned", dtype=torch.bfloat16)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["lm_head.weight"].shape == (40, H)
    assert tensors["markov_head.markov_w2.weight"].shape == (40, 8)
    assert tensors["markov_head.markov_w1.weight"].shape == (V, 8) and "t2d" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16 and "layers.0.layer_scalar" in tensors
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 40 and cfg["architectures"] == ["Gemma4DSparkModel"]
    loaded = load_draft(out, dtype=torch.float32)
    assert torch.equal(loaded.t2d, model.t2d) and torch.equal(loaded.d2t, model.d2t)
    ids = torch.randint(0, V, (1, 10))
    feats, _ = features_of(target, ids)
    ref = model.to(torch.bfloat16).float()(feats, ids, torch.tensor([[4]]))
    torch.testing.assert_close(loaded(feats, ids, torch.tensor([[4]])), ref)


def test_eagle3_dir_round_trip(tmp_path):
    vocab = build_draft_vocab(torch.arange(V).flip(0), 50, always_include=[95])
    target = tiny_target("llama")
    cfg = Eagle3Config.from_target(target.config, target_layer_ids=LAYERS, draft_vocab_size=50)
    model = perturb(Eagle3Model(cfg).init_from_target(target, vocab.kept_ids))
    out = save_draft(model, tmp_path / "eagle3")
    tensors = load_file(str(out / "model.safetensors"))
    assert {"d2t", "t2d", "fc.weight", "norm.weight", "lm_head.weight", "midlayer.hidden_norm.weight",
            "midlayer.self_attn.q_proj.weight"} <= set(tensors)
    assert all(k.startswith(("midlayer.", "d2t", "t2d", "fc.", "norm.", "lm_head.", "embed_tokens."))
               for k in tensors)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (4 * 8, 2 * H)
    assert torch.equal(ids_from_d2t(tensors["d2t"]), vocab.kept_ids)
    data = json.loads((out / "config.json").read_text())
    assert data["num_hidden_layers"] == 1 and data["draft_vocab_size"] == 50
    loaded = load_draft(out)
    ids = torch.randint(0, V, (1, 9))
    feats, _ = features_of(target, ids)
    for a, b in zip(loaded(feats, ids), model(feats, ids)):
        assert torch.equal(a, b)
    # full vocabulary: draft_vocab_size is still written (llama.cpp detects EAGLE-3 by it)
    full = save_draft(Eagle3Model(Eagle3Config.from_target(target.config, target_layer_ids=LAYERS)),
                      tmp_path / "full")
    assert json.loads((full / "config.json").read_text())["draft_vocab_size"] == V


def test_load_names_missing_extra_and_misshaped_tensors(tmp_path):
    _, model = dspark()
    out = save_draft(model, tmp_path / "d")
    tensors = load_file(str(out / "model.safetensors"))
    tensors.pop("norm.weight")
    tensors["bogus.weight"] = torch.zeros(1)
    tensors["fc.weight"] = torch.zeros(H, H)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(InputError) as e:
        load_draft(out)
    assert "norm.weight" in str(e.value) and "bogus.weight" in str(e.value) and "fc.weight" in str(e.value)
    cfg = json.loads((out / "config.json").read_text())
    cfg["draftsmith"]["kind"] = "medusa"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="unknown drafter kind 'medusa'"):
        load_draft(out)


def test_deepspec_dir_without_our_metadata_loads(tmp_path):
    target, model = dspark(markov_head_type="gated")
    out = save_draft(model, tmp_path / "ds")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["draftsmith"]
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = load_draft(out)
    assert loaded.config.markov_head_type == "gated" and loaded.config.num_hidden_layers == 2
    ids = torch.randint(0, V, (1, 8))
    feats, _ = features_of(target, ids)
    assert torch.equal(loaded(feats, ids, torch.tensor([[5]])), model(feats, ids, torch.tensor([[5]])))


def test_save_refuses_to_replace_a_foreign_dir(tmp_path):
    _, model = dspark()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="refusing"):
        save_draft(model, tmp_path / "run")
    save_draft(model, tmp_path / "d")
    save_draft(model, tmp_path / "d")  # replacing a draft dir is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "run"]


# --------------------------------------------------------------------------- vocabulary


def test_draft_vocab_maps_round_trip_and_scatter():
    counts = torch.tensor([5, 0, 9, 9, 1, 0, 7, 3])
    vocab = build_draft_vocab(counts, 4, always_include=[1])
    assert vocab.kept_ids.tolist() == [1, 2, 3, 6]  # forced 1, then 9, 9 (lower id first), 7
    assert vocab.d2t.tolist() == [1, 1, 1, 3]
    check_vocab_maps(vocab.d2t, vocab.t2d)
    draft_ids = torch.arange(4)
    assert torch.equal(draft_to_target(draft_ids, vocab.d2t), vocab.kept_ids)
    assert torch.equal(target_to_draft(vocab.kept_ids, vocab.t2d), draft_ids)
    assert target_to_draft(torch.tensor([0, 7]), vocab.t2d).tolist() == [-1, -1]
    logits = torch.randn(2, 4)
    full = scatter_draft_logits(logits, vocab.d2t, 8)
    assert torch.equal(full[:, vocab.kept_ids], logits)  # a copy: bitwise
    assert torch.all(full[:, ~vocab.t2d] == float("-inf"))
    # The pruned ids hold no probability: softmax over the 8 columns = softmax over the 4 kept.
    # Rows of 8 and of 4 columns take different vectorized paths through the softmax kernel, so
    # they agree up to rounding only (measured on an AVX2 CPU over 4000 draws: not bitwise in 44 %,
    # at most 2.7e-7 relative = 2.3 float32 ulps). rtol 4e-6 (~34 ulps) allows that; the faults
    # below move every kept probability by >= 7.7e-4 relative.
    want = logits.softmax(-1)
    torch.testing.assert_close(full.softmax(-1)[:, vocab.kept_ids], want, rtol=4e-6, atol=0)
    for leak in (torch.zeros(2, 1),  # pruned ids left at 0 (a zeros buffer, not -inf)
                 logits.max(-1, keepdim=True).values - 8):  # left e^-8 below the row's best
        leaky = full.clone()
        leaky[:, ~vocab.t2d] = leak
        with pytest.raises(AssertionError):
            torch.testing.assert_close(leaky.softmax(-1)[:, vocab.kept_ids], want, rtol=4e-6, atol=0)


def test_draft_vocab_errors():
    with pytest.raises(InputError, match="draft_vocab_size"):
        build_draft_vocab(torch.ones(8), 9)
    with pytest.raises(InputError, match="always_include"):
        build_draft_vocab(torch.ones(8), 2, always_include=[0, 1, 2])


# --------------------------------------------------------------------------- configs


def test_default_layer_ids():
    assert default_dspark_layers(36) == [1, 9, 17, 25, 33]  # Qwen3-4B/8B (DeepSpec)
    assert default_dspark_layers(40) == [1, 10, 19, 28, 37]  # Qwen3-14B
    assert default_eagle3_layers(36) == [1, 17, 32]
    cfg = DSparkConfig.from_target(tiny_config("qwen3"), mask_token_id=3)
    assert cfg.target_layer_ids == [1] and cfg.num_hidden_layers == 5 and cfg.block_size == 7


@pytest.mark.parametrize("cls,overrides,field", [
    (DSparkConfig, {"mask_token_id": 96}, "mask_token_id"),
    (DSparkConfig, {"mask_token_id": 3, "draft_vocab_size": 97}, "draft_vocab_size"),
    (DSparkConfig, {"mask_token_id": 3, "target_layer_ids": [0, 7]}, "target_layer_ids"),
    (DSparkConfig, {"mask_token_id": 3, "target_layer_ids": [1, 3]}, "final layer"),
    (DSparkConfig, {"mask_token_id": 3, "markov_rank": 0}, "confidence_head_with_markov"),
    (DSparkConfig, {"mask_token_id": 3, "markov_head_type": "lstm"}, "markov_head_type"),
    (DSparkConfig, {"mask_token_id": 3, "blocksize": 4}, "blocksize"),
    (DFlashConfig, {"mask_token_id": 3, "markov_rank": 8}, "markov_rank"),
    (Eagle3Config, {"target_layer_ids": [0, 1]}, "target_layer_ids"),
    (Eagle3Config, {"target_layer_ids": [0, 1, 3]}, "final layer"),
    (Eagle3Config, {"target_layer_ids": [0, 1, 2], "draft_vocab_size": 200}, "draft_vocab_size"),
])
def test_config_errors_name_the_field(cls, overrides, field):
    with pytest.raises(InputError, match=field):
        cls.from_target(tiny_config("llama"), **overrides)


def test_direct_construction_errors_name_the_field():
    geometry = DSparkConfig.from_target(tiny_config("qwen3"), mask_token_id=3).model_dump()
    with pytest.raises(ValidationError, match="mask_token_id"):
        DSparkConfig(**{**geometry, "mask_token_id": -1})


def test_gemma_k_eq_v_drops_v_proj_and_still_matches_inference():
    target, model = dspark("gemma", attention_k_eq_v=True)
    names = set(model.state_dict())
    assert not any("v_proj" in n for n in names) and "layers.0.post_feedforward_layernorm.weight" in names
    model = model.double()
    ids = torch.randint(0, V, (1, 10))
    feats, _ = features_of(target.double(), ids)
    cache = model.new_cache()
    model.append_context(cache, feats[:, :5])
    prop = model.propose(cache, ids[:, 5], 5)
    torch.testing.assert_close(prop.hidden, model(feats, ids, torch.tensor([[5]]))[:, 0], rtol=0, atol=1e-12)

"""Every shipped recipe loads, and its drafter config validates against its target's geometry."""

import pytest
from transformers import LlamaConfig, Qwen3Config

from draftsmith.train.recipe import load_recipe, shipped_recipes

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                      tie_word_embeddings=True)
QWEN3 = {  # published geometries (config.json of each checkpoint)
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40),
}


def test_the_cpu_and_gpu_recipes_are_shipped():
    names = shipped_recipes()
    for n in ["smollm2-135m/dspark", "smollm2-135m/dflash", "smollm2-135m/eagle3", "qwen3-4b/dspark",
              "qwen3-8b/dspark", "qwen3-14b/dspark", "gemma-4-12b/dspark"]:
        assert n in names


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.split("/")[0] in {"smollm2-135m", *QWEN3}])
def test_recipe_validates_against_its_target(name):
    recipe = load_recipe(name)
    family = name.split("/")[0]
    if family == "smollm2-135m":
        target = SMOLLM2
    else:
        target = Qwen3Config(vocab_size=151936, num_key_value_heads=8, head_dim=128, **QWEN3[family])
    cfg = recipe.model_config_class().from_target(target, **recipe.model)
    assert cfg.target_layer_ids == recipe.model["target_layer_ids"]


def test_gemma_recipes_follow_deepspec():
    # Gemma-4-12B's geometry needs its hub config (not reproduced offline): check the recipe itself
    for name in ("gemma-4-12b/dspark", "gemma-4-12b/dflash"):
        r = load_recipe(name)
        assert r.model["target_layer_ids"] == [5, 17, 29, 41, 46] and r.model["mask_token_id"] == 4


def test_dspark_and_dflash_smollm2_recipes_share_everything_but_the_heads():
    a, b = load_recipe("smollm2-135m/dspark"), load_recipe("smollm2-135m/dflash")
    heads = {"markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"}
    assert {k: v for k, v in a.model.items() if k not in heads} == b.model
    assert (a.data, a.features, a.optim, a.train) == (b.data, b.features, b.optim, b.train)
    head_init = {"markov", "bigram_smoothing"}  # how DSpark's Markov head starts: a head setting
    assert a.init.model_dump(exclude=head_init) == b.init.model_dump(exclude=head_init)
    # the same label source for the token loss (issue 14): only the heads' own terms differ
    head_terms = {"l1", "bce"}  # DSpark's confidence head (bce) and its L1 to p_t
    assert a.loss.weights is not None and b.loss.weights is not None
    assert a.loss.weights.model_dump(exclude=head_terms) == b.loss.weights.model_dump(exclude=head_terms)
    assert a.loss.average == b.loss.average

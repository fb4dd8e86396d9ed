"""The drafter contract, walked over the registry: every drafter builds on a tiny target, trains
one step through its objective (batches collated the way its spec says), saves and loads back
bit-exact, decodes through its proposer exactly as plain decoding does (greedy, float64),
exports in every format it claims (read back where the format can be) and is refused in one
line that lists those formats in every other one. Unknown drafter names fail in one line too."""

import pytest
import torch

from draftsmith import drafters
from draftsmith.cli import main
from draftsmith.drafters import REGISTRY
from draftsmith.export import FORMATS, export, import_draft
from draftsmith.export.manifest import read_manifest
from draftsmith.features.online import SampleFeatures
from draftsmith.models.base import drafter_configs
from draftsmith.models.io import load_draft, save_draft
from draftsmith.decoding import PlainProposer, SpecEngine, proposer_for
from draftsmith.targets.model import TargetModel
from draftsmith.train.loop import collate
from draftsmith.train.objectives import target_head_from
from draftsmith.train.recipe import Recipe, load_recipe
from draftsmith.utils.io import InputError
from export_reference import GGUFStandIns
from train_fixtures import make_target_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# the same small sizes for every drafter, set where its config has the field
TINY = {"num_hidden_layers": 1, "block_size": 3, "ttt_length": 3, "num_anchors": 8,
        "mask_token_id": 5, "target_layer_ids": [0, 1, 2]}
PROMPTS = [[3, 7, 2, 8, 9], [5, 6]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(HF dir, the target in fp32, the target in fp64) of a tiny random Llama."""
    from transformers import AutoModelForCausalLM

    target_dir = make_target_dir(tmp_path_factory.mktemp("target"), "llama")
    return (target_dir, AutoModelForCausalLM.from_pretrained(target_dir).eval(),
            AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float64).eval())


def tiny_draft(spec, hf, seed: int = 0):
    fields = spec.config.model_fields
    overrides = {k: v for k, v in TINY.items() if k in fields}
    if "markov_rank" in fields and fields["markov_rank"].default:
        overrides["markov_rank"] = 8  # a head where the drafter has one by default
    cfg = spec.config.from_target(hf.config, **overrides)
    torch.manual_seed(seed)
    return spec.build(cfg).init_from_target(hf)


def sample_features(hf, layer_ids, seed: int = 0) -> list[SampleFeatures]:
    """Two random sequences whose second half is the response, with the target's features."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, hf.config.vocab_size, (2, 24), generator=gen)
    mask = torch.zeros_like(ids, dtype=torch.uint8)
    mask[:, 12:] = 1
    with torch.no_grad():
        out = TargetModel(hf, list(layer_ids))(ids)
    return [SampleFeatures(f"r{b}", ids[b], mask[b], out.features[b], out.hidden[b],
                           torch.ones(24, dtype=torch.bool)) for b in range(2)]


def test_the_registry_and_the_model_configs_name_the_same_drafters():
    configs = drafter_configs()
    assert sorted(REGISTRY) == sorted(configs) and len(REGISTRY) >= 3
    for name, spec in REGISTRY.items():
        assert spec.name == name and configs[name] is spec.config
        assert drafters.get(name) is spec


def test_unknown_drafter_names_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(InputError) as e:
        drafters.get("medusa")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("drafter: medusa\n")
    with pytest.raises(InputError) as r:
        load_recipe(str(recipe))
    assert main(["train", "--recipe", str(recipe), "--data", str(recipe), "--out",
                 str(tmp_path / "run")]) == 2
    cli = capsys.readouterr().err.strip()
    for msg in (str(e.value), str(r.value), cli):
        assert "\n" not in msg and "'medusa'" in msg
        assert all(name in msg for name in REGISTRY)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_one_train_step_through_the_objective(target, name):
    spec = REGISTRY[name]
    _, hf, _ = target
    model = tiny_draft(spec, hf).train()
    feats = sample_features(hf, model.config.target_layer_ids)
    batch = collate(feats, [0, 0], Recipe(drafter=name), spec.anchored, "cpu",
                    getattr(model.config, "num_anchors", 1))
    assert (batch.anchor_pos is not None) == spec.anchored
    objective = spec.build_objective(model, target_head_from(hf.get_output_embeddings()))
    assert type(objective) is spec.objective and objective.loss_weights == spec.default_loss_weights
    assert type(drafters.build_objective(model, None)) is spec.objective
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    parts = objective(batch)
    parts.loss.backward()
    torch.optim.AdamW(params, lr=1e-2).step()
    loss = parts.loss.detach()
    assert torch.isfinite(loss) and float(loss) > 0 and float(parts.tokens) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_save_load_round_trip(target, tmp_path, name):
    spec = REGISTRY[name]
    model = tiny_draft(spec, target[1])
    loaded = load_draft(save_draft(model, tmp_path / "draft"))
    assert type(loaded) is type(model) and loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_its_proposer_decodes_as_plain_decoding_does(target, name):
    spec = REGISTRY[name]
    _, hf32, hf = target
    model = tiny_draft(spec, hf32).double()
    proposer = spec.make_proposer(model, num_tokens=3)
    assert type(proposer) is spec.proposer and type(proposer_for(model, 3)) is spec.proposer
    plain = SpecEngine(TargetModel(hf, []), PlainProposer()).generate(PROMPTS, 12)
    out = SpecEngine(TargetModel(hf, proposer.target_layer_ids), proposer).generate(PROMPTS, 12)
    assert out.outputs == plain.outputs
    assert sum(sum(r.proposed) for r in out.rounds) > 0  # the draft did propose


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_claimed_export_and_only_those(target, tmp_path, name):
    spec = REGISTRY[name]
    target_dir, hf, _ = target
    model = tiny_draft(spec, hf)
    src = save_draft(model, tmp_path / "draft")
    claimed = spec.formats
    assert "draftsmith" in claimed and set(claimed) <= set(FORMATS)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with GGUFStandIns():  # llama.cpp's converter itself runs in test_export.py
        for fmt, adapter in claimed.items():
            out = export(src, fmt, tmp_path / fmt, target=str(target_dir))
            manifest = read_manifest(out)
            assert manifest["drafter"] == name and manifest["export_format"] == fmt
            assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"draftsmith_manifest.json"}
            if adapter.readable:
                got = import_draft(out).state_dict()
                assert set(got) == set(want) and all(torch.equal(want[k], got[k]) for k in want), fmt
    for fmt in set(FORMATS) - set(claimed):
        with pytest.raises(InputError) as e:
            export(src, fmt, tmp_path / fmt, target=str(target_dir))
        msg = str(e.value)
        assert "\n" not in msg and f"--format {fmt}" in msg and all(f in msg for f in claimed)
        assert not (tmp_path / fmt).exists()


"""Feature-cache integrity: a cache whose records no longer match the run's data is refused (record
fingerprints, max_length, format version), a shard corrupted in place fails before it feeds a step
(per-shard checksum), and oversize records are guarded, counted and named by `cache estimate|build`."""

import json
import re
from dataclasses import replace

import pytest
import torch

from draftsmith.data.templates import RenderedSample
from draftsmith.features import FeatureCache, FeatureCacheError, FeaturePolicy, build_cache
from draftsmith.train.dataset import TrainData
from draftsmith.train.parallel import DistInfo
from draftsmith.train.recipe import Recipe
from draftsmith.train.setup import FeatureSource, _cache_dir, feature_source
from draftsmith.utils.io import InputError
from test_features import _args, make_samples, make_target, tiny_hf_target  # noqa: F401 (fixture)

MAX_LENGTH = 64  # make_samples writes at most 40 tokens per sample: nothing is truncated


def recipe(max_length: int = MAX_LENGTH, cache_dir: str | None = None) -> Recipe:
    return Recipe(drafter="dspark", data={"max_length": max_length},
                  features={"mode": "cache", "dtype": "bf16", "cache_dir": cache_dir})


def open_for_run(path, target, train, heldout=(), max_length: int = MAX_LENGTH):
    """What `train --cache PATH` does: build the cache if it is not complete, open it, check it."""
    data = TrainData(list(train), list(heldout))
    return feature_source(recipe(max_length), target, data, DistInfo(), None, str(path), progress=False)


def same_shape_edit(s: RenderedSample) -> RenderedSample:
    """The same id, length and loss-mask sum, another token at one answer position."""
    t = s.loss_mask.index(1)
    ids = list(s.input_ids)
    ids[t] = (ids[t] + 1) % 96
    return replace(s, input_ids=ids)


# ---- 1. stale cache ----------------------------------------------------------------------------

def test_run_refuses_a_cache_whose_records_changed_under_the_same_ids(tmp_path):
    target, samples = make_target(), make_samples(12)
    train, held = samples[:9], samples[9:]
    source = open_for_run(tmp_path, target, train, held)  # builds the cache
    assert source.cache is not None and len(source.cache) == 12
    open_for_run(tmp_path, target, train[:5])  # a run may use a subset of the cache's records
    for new_train, new_held, changed in [(train[:4] + [same_shape_edit(train[4])] + train[5:], held, train[4].id),
                                         (train, [same_shape_edit(held[1])], held[1].id)]:
        with pytest.raises(InputError) as e:
            open_for_run(tmp_path, target, new_train, new_held)
        msg = str(e.value)
        assert repr(changed) in msg and str(tmp_path) in msg
        assert "rebuild" in msg and "--cache" in msg


def test_records_sharing_an_id_are_refused_not_served_one_for_the_other(tmp_path):
    target, (a, b) = make_target(), make_samples(2)
    dup = [a, replace(b, id=a.id)]
    with pytest.raises(InputError, match=rf"{a.id!r}(.|\n)*occur more than once(.|\n)*unique"):
        open_for_run(tmp_path, target, dup)


def test_run_refuses_a_cache_built_with_another_max_length(tmp_path):
    target, samples = make_target(), make_samples(6)
    open_for_run(tmp_path, target, samples, max_length=MAX_LENGTH)
    with pytest.raises(InputError, match=rf"max_length {MAX_LENGTH}(.|\n)*48"):
        open_for_run(tmp_path, target, samples, max_length=48)


def test_default_cache_key_changes_with_the_record_content():
    target, samples = make_target(), make_samples(6)
    edited = samples[:2] + [same_shape_edit(samples[2])] + samples[3:]
    assert _cache_dir(recipe(), target, samples) == _cache_dir(recipe(), target, list(samples))
    assert _cache_dir(recipe(), target, samples) != _cache_dir(recipe(), target, edited)


def test_manifest_records_fingerprints_and_a_cache_without_them_is_refused(tmp_path):
    target, samples = make_target(), make_samples(6)
    build_cache(target, samples, tmp_path, dtype="bf16", shard_tokens=60, max_length=MAX_LENGTH,
                progress=False)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["version"] == 2 and manifest["max_length"] == MAX_LENGTH
    prints = [p for e in manifest["shards"] for p in e["record_fingerprints"]]
    assert len(prints) == 6 and len(set(prints)) == 6
    for e in manifest["shards"]:  # as written by the version-1 format
        e.pop("record_fingerprints")
        e.pop("crc32")
    path.write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(FeatureCacheError, match=r"version 1(.|\n)*rebuild"):
        open_for_run(tmp_path, target, samples)


# ---- 2. corrupt shard --------------------------------------------------------------------------

def test_shard_overwritten_in_place_fails_naming_the_shard_before_it_is_read(tmp_path):
    target, samples = make_target(), make_samples(24)
    build_cache(target, samples, tmp_path, dtype="bf16", shard_tokens=100, progress=False)
    shard = tmp_path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid - 2000:mid + 2000] = b"\x7f" * 4000  # bf16 0x7f7f = 3.39e38, same file size
    shard.write_bytes(bytes(data))
    cache = FeatureCache.open(tmp_path)  # verify=False: no full hash at open
    first, end = cache.manifest["shards"][1]["samples"]
    assert cache[0].features.abs().max() < 1e3  # the other shards stay readable
    for _ in range(2):  # and stays refused on every later read
        with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors(.|\n)*corrupt"):
            cache[first]
    source = FeatureSource(target, FeatureCache.open(tmp_path), FeaturePolicy())  # what train steps read
    with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors"):
        source(samples[first:end])


def test_intact_shards_read_the_same_with_the_check(tmp_path):
    target, samples = make_target(), make_samples(24)
    build_cache(target, samples, tmp_path, dtype="bf16", shard_tokens=100, progress=False)
    cache = FeatureCache.open(tmp_path, max_open_shards=1)
    first = [cache[i].features for i in range(len(cache))]
    again = [cache[i].features for i in reversed(range(len(cache)))][::-1]  # shards reopened
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all("crc32" in e for e in cache.manifest["shards"])


# ---- 3. record-size guard and named reconciliation ---------------------------------------------

def _write_records(path, big_chars: int = 0) -> None:
    recs = [{"id": f"ok{i}", "conversations": [{"role": "user", "content": f"Hello {i}?"},
                                               {"role": "assistant", "content": "The quick brown fox."}]}
            for i in range(4)]
    # a prompt longer than max_length: truncated to prompt tokens only, then dropped
    recs.insert(1, {"id": "longq", "conversations": [
        {"role": "user", "content": "How are you today? " * 60},
        {"role": "assistant", "content": "Fine."}]})
    if big_chars:
        recs.insert(3, {"id": "big", "conversations": [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "x" * big_chars}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_truncated_then_dropped_record_is_counted_and_named(tmp_path, tiny_hf_target, capsys):
    from draftsmith.features.commands import add_estimate_args, run_estimate

    data = tmp_path / "d.jsonl"
    _write_records(data)
    argv = ["--target", str(tiny_hf_target), "--data", str(data), "--max-length", "64", "--layers", "0,2"]
    assert run_estimate(_args(add_estimate_args, argv)) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"data {data}"))
    assert "4 samples kept" in line
    assert "1 without a trainable token (dropped: 'longq')" in line
    assert re.search(r"1 truncated at max_length 64 \('longq'", line), line


def test_record_size_guard_skips_before_tokenizing_and_names_it(tmp_path, tiny_hf_target, capsys, monkeypatch):
    import draftsmith.features.commands as commands

    data, out = tmp_path / "d.jsonl", tmp_path / "cache"
    _write_records(data, big_chars=50_000)
    common = ["--target", str(tiny_hf_target), "--data", str(data), "--max-length", "64", "--layers", "0,2"]
    assert _args(commands.add_estimate_args, common).max_record_chars == 1_000_000  # the default
    rendered = []
    render = commands.render_records
    monkeypatch.setattr(commands, "render_records",
                        lambda tok, recs, *a, **k: (rendered.extend(r["id"] for r in recs), render(tok, recs, *a, **k))[1])
    guarded = common + ["--max-record-chars", "20000"]
    assert commands.run_estimate(_args(commands.add_estimate_args, guarded)) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"data {data}"))
    assert "big" not in rendered and "longq" in rendered
    assert "1 over --max-record-chars 20000 (skipped: 'big')" in line and "4 samples kept" in line
    argv = guarded + ["--out", str(out), "--no-progress", "--shard-tokens", "100"]
    assert commands.run_build(_args(commands.add_build_args, argv)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"cache {out}:") and "'big'" in last and "'longq'" in last
    src = FeatureCache.open(out).manifest["source"]
    assert src["max_record_chars"] == 20000 and src["skipped_too_long"] == 1
    assert src["ids"]["skipped_too_long"] == ["big"] and src["ids"]["dropped_no_trainable"] == ["longq"]
    assert "longq" in src["ids"]["truncated"] and src["truncated"] == len(src["ids"]["truncated"])

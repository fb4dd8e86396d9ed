"""The demo's pieces that are not other commands: its last line (the served truth next to the
shipped recipe's measured figure), the held-out prompts it evaluates when ../shared is absent,
and where serve-check tunes."""

import json

from draftsmith import quickstart


def served_result(speedup=0.8) -> dict:
    return {"speedup": speedup, "plain_fastest": {"file": "/cache/SmolLM2.Q4_1.gguf", "tokens_per_s": 100.0},
            "machine": {"cpu": "Some CPU, 2 cores, AVX2"},
            "draft": {"overall": {"served_tau": 1.31, "break_even_tau": 1.64}},
            "serve": {"dtype": "q8_0", "n_max": 2, "p_min": 0.45}}


def test_truth_line_names_speedup_break_even_cpu_and_the_reference(tmp_path, monkeypatch):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"speedup": 1.07, "served_tau": 1.9, "break_even_tau": 1.77,
                               "cpu": "AMD EPYC, 2 cores, AVX2", "commit": "e47d188"}))
    monkeypatch.setattr(quickstart, "REFERENCE", ref)
    line = quickstart.truth(served_result(), trained=None)
    assert "served speedup 0.80× against plain SmolLM2.Q4_1.gguf (100.0 tok/s) on Some CPU, 2 cores, AVX2" in line
    assert "served τ 1.31, break-even τ 1.64" in line and "q8_0, n_max 2, p_min 0.45" in line
    assert "recipe's draft at e47d188 (README): 1.07× (served τ 1.90, break-even τ 1.77) on AMD EPYC, 2 cores, AVX2" in line
    # a trained draft passed in: its own measurement only
    assert "README" not in quickstart.truth(served_result(), trained="RUN")
    monkeypatch.setattr(quickstart, "REFERENCE", tmp_path / "absent.json")
    assert "no measured served figure yet" in quickstart.truth(served_result(), trained=None)


def test_the_shipped_reference_is_well_formed():
    ref = json.loads(quickstart.REFERENCE.read_text())
    for key in ("speedup", "served_tau", "break_even_tau", "cpu", "commit", "command"):
        assert ref[key] not in (None, ""), key


def test_held_out_conversations_become_eval_prompts(tmp_path):
    held = tmp_path / "heldout.jsonl"
    rows = [{"id": "a", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                          {"role": "user", "content": "More?"}]},
            {"id": "b", "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = quickstart._eval_source(type("A", (), {"eval_dir": str(tmp_path / "none")})(), held)
    prompts = tmp_path / "heldout-prompts.jsonl"
    assert source == ["--datasets", str(prompts)]
    assert [json.loads(line)["turns"] for line in prompts.read_text().splitlines()] == [["Hi", "More?"], ["Q"]]
    assert quickstart._tune_source(source) == ["--tune-datasets", str(prompts)]
    (tmp_path / "mbpp.jsonl").write_text("")
    assert quickstart._tune_source(["--datasets", "gsm8k", "--eval-dir", str(tmp_path)]) == ["--tune-datasets", "mbpp"]

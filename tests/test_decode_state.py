"""The decode loop's device-side state: batched EAGLE-3 drafting equals drafting each row alone
(float64), the committed tokens live in a device tensor, and a round asks the device for host
values once."""

import collections

import pytest
import torch
from test_decoding import NEW, PROMPTS, eagle3_draft, engine, hf_greedy, make_proposer, perturb, target

from draftsmith.decoding import Eagle3Proposer, SamplingConfig
from draftsmith.decoding.kv import RaggedKVCache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ragged_eagle3_chain_equals_each_row_alone():
    """`propose_rows` over rows of different lengths drafts what `propose` drafts for each row
    with its own batch-1 cache, over two rounds (the second extends by different counts)."""
    hf = target("qwen3")
    model = perturb(eagle3_draft(hf), 0.1).eval()
    H3, g = 3 * hf.config.hidden_size, torch.Generator().manual_seed(0)
    lengths, extra = [5, 2, 8], [3, 1, 2]
    N1, N2 = max(lengths), max(extra)
    feats1 = torch.randn(3, N1, H3, generator=g, dtype=torch.float64)
    feats2 = torch.randn(3, N2, H3, generator=g, dtype=torch.float64)
    ids1, ids2 = torch.randint(0, 10, (3, N1), generator=g), torch.randint(0, 10, (3, N2), generator=g)
    ragged = RaggedKVCache(1, 3)
    batched = [model.propose_rows(ragged, feats1, ids1, torch.tensor(lengths), 4, N1),
               model.propose_rows(ragged, feats2, ids2, torch.tensor(extra), 4,
                                  max(a + b for a, b in zip(lengths, extra)))]
    assert ragged.row_lengths.tolist() == [a + b for a, b in zip(lengths, extra)]
    for r, (n1, n2) in enumerate(zip(lengths, extra)):
        cache = model.new_cache()
        alone = [model.propose(cache, feats1[r:r + 1, :n1], ids1[r:r + 1, :n1], 4),
                 model.propose(cache, feats2[r:r + 1, :n2], ids2[r:r + 1, :n2], 4)]
        for b, a in zip(batched, alone):
            assert b.tokens[r].tolist() == a.tokens[0].tolist()
            torch.testing.assert_close(b.logits[r], a.logits[0], rtol=0, atol=1e-10)
    # negative control: a row that reads another row's entries drafts something else
    wrong = model.propose(model.new_cache(), feats1[1:2, :lengths[0]], ids1[1:2, :lengths[0]], 4)
    assert not torch.allclose(wrong.logits[0], batched[0].logits[0], atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_batched_eagle3_rows_equal_rows_decoded_alone(family):
    """Rows decoded together commit exactly the tokens, and accept exactly the drafts, that they
    commit and accept decoded one at a time (and both equal target-only greedy)."""
    hf = target(family)
    draft = perturb(eagle3_draft(hf, seed=1), 1.0, seed=1)  # accepts some drafts on both families
    together = engine(hf, Eagle3Proposer(draft, num_tokens=4)).generate(PROMPTS, NEW)
    per_row = collections.defaultdict(list)
    for rec in together.rounds:
        for row, a in zip(rec.rows, rec.accepted):
            per_row[row].append(a)
    for r, prompt in enumerate(PROMPTS):
        alone = engine(hf, Eagle3Proposer(draft, num_tokens=4)).generate([prompt], NEW)
        assert alone.outputs[0] == together.outputs[r]
        assert [rec.accepted[0] for rec in alone.rounds] == per_row[r]
    assert together.outputs == hf_greedy(hf, PROMPTS)
    assert sum(sum(v) for v in per_row.values()) > 0  # some drafts were accepted


def _count_host_reads(monkeypatch) -> collections.Counter:
    """Count every device -> host read of a tensor's values."""
    calls = collections.Counter()
    for name in ("tolist", "item", "__int__", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)])
def test_eagle3_round_reads_the_device_once(monkeypatch, sampling):
    hf = target("qwen3")
    run = engine(hf, make_proposer("eagle3", hf, None), sampling=sampling).start(PROMPTS, NEW)
    assert isinstance(run.state.tokens, torch.Tensor) and not hasattr(run.state, "_seqs")
    calls = _count_host_reads(monkeypatch)
    rounds = 0
    while not run.done:
        run.step()
        rounds += 1
    assert rounds > 3 and sum(calls.values()) == rounds, dict(calls)
    monkeypatch.undo()
    assert run.result().outputs[0] and all(len(o) <= NEW for o in run.result().outputs)


def test_device_state_tracks_the_committed_tokens():
    """`DecodeState.tokens` / `lengths` hold prompt + generated ids of the active rows, and the
    host lengths the engine keeps are exact."""
    hf = target("qwen3")
    refs = hf_greedy(hf, PROMPTS)
    run = engine(hf, make_proposer("oracle", hf, refs)).start(PROMPTS, NEW)
    while not run.done:
        st = run.state
        assert st.lengths.tolist() == st.host_lengths
        for seq, row, plen in zip(st.seqs, st.rows, st.prompt_lengths):
            assert seq == PROMPTS[row] + refs[row][:len(seq) - plen]
        run.step()
    assert run.result().outputs == refs


def test_compile_is_a_logged_no_op_on_cpu(caplog):
    hf = target("qwen3")
    refs = hf_greedy(hf, PROMPTS)
    with caplog.at_level("INFO", logger="draftsmith.decoding.engine"):
        eng = engine(hf, make_proposer("eagle3", hf, refs), compile=True)
    assert "CUDA only" in caplog.text and eng.forward is eng.target
    assert eng.generate(PROMPTS, NEW).outputs == refs

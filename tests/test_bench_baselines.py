"""bench/tau_sim_baselines.py's feature-copy match: the most recent earlier occurrence of the last N tokens."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tau_sim_baselines.py"


def test_last_match_finds_the_most_recent_earlier_occurrence():
    spec = importlib.util.spec_from_file_location("tau_sim_baselines", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = [5, 1, 2, 3, 1, 2, 9, 1, 2]
    assert bench.last_match(ids, 8, 1) == 5  # the 2 at 5, not the one at 2
    assert bench.last_match(ids, 8, 2) == 5  # (1, 2) ends at 5
    assert bench.last_match(ids, 8, 3) is None  # (9, 1, 2) never occurred before
    assert bench.last_match(ids, 6, 1) is None  # 9 is new
    assert bench.last_match(ids, 4, 1) == 1  # never the anchor itself

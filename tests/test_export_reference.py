"""Every drafter variant × export format writes the bytes it wrote before the drafter registry
(issue 16): sha256 per exported file against `fixtures/export_sha256.json`, volatile values
(version, tmp paths, the target's fingerprint) normalized (see export_reference.py)."""

import json

import pytest

from export_reference import CASES, FIXTURE, FORMATS, export_case

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export-ref")


def test_the_reference_covers_every_case_and_format_and_tells_them_apart(reference):
    assert set(reference) == {f"{c}/{f}" for c in CASES for f in FORMATS}
    written = [json.dumps(v, sort_keys=True) for v in reference.values() if v != "refused"]
    assert len(written) == len(set(written))  # no two exports hash alike: the hashes see content
    assert sum(v == "refused" for v in reference.values()) < len(reference) // 2


@pytest.mark.parametrize("case", list(CASES))
def test_exports_are_byte_identical_to_the_reference(root, reference, case):
    want = {k: v for k, v in reference.items() if k.startswith(f"{case}/")}
    assert export_case(root, case) == want

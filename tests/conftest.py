import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from draftsmith.target.model import load_tokenizer

    return load_tokenizer("smollm2-135m")

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are dominated by thread hand-offs; one thread is also robust to a busy machine.
    Use it per file with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from draftsmith.targets.model import load_tokenizer

    return load_tokenizer("smollm2-135m")

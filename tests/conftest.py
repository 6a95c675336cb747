import os
import sys
import tempfile

# Every test compiles from scratch: a compile-cache hit would skip the runlora pass (and its
# counters and reports), which is what several tests observe. test_backend.py turns caches back on
# where it tests them.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
# The measured product forms are kept on disk (lora_rewrite/tuning.py): the tests keep theirs apart
# from the user's, in a folder of this run.
os.environ.setdefault("RUNLORA_CACHE_DIR", tempfile.mkdtemp(prefix="runlora-test-forms-"))
# The suite runs strict (lora_rewrite/containment.py): an exception inside runlora fails the test instead
# of being contained, so containment never hides a bug from CI. tests/test_containment.py turns it off.
os.environ.setdefault("RUNLORA_STRICT", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()

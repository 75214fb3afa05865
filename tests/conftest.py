import os
import tempfile

import pytest

from loader.default_model import build_model_dir

# The native kernel is built into a directory of this test session, not the user's ~/.cache (which may be
# read-only, or hold a build of other sources).
os.environ["LORAPLEX_KERNEL_DIR"] = tempfile.mkdtemp(prefix="loraplex-kernel-")
# The tests run on the CPU: the triton kernel runs there in Triton's interpreter (read when a kernel is defined).
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random Llama, Qwen2, GPT-2 and OPT models (fp32, byte tokenizer), built once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model_dir(root / arch, arch, seed=1) for arch in ("llama", "qwen2", "gpt2", "opt")}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """(train, eval) JSONL files of the reverse task for the training tests (tests.helpers.training_job)."""
    from tests.helpers import write_task
    d = tmp_path_factory.mktemp("data")
    return write_task(d / "train.jsonl", 200, 0), write_task(d / "eval.jsonl", 32, 1)

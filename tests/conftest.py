"""Shared fixtures. Nothing may reach a hub: tests run offline on the bundled model/corpus."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run under its CPU interpreter; it reads this variable when
# triton is first imported, which no module does before the tests import saekit.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Tests that run the model (load it, harvest through it, train a run on its activations, pre-train
# a series) take most of the suite's time: `-m "not slow"` leaves them out for a first check.
HEAVY = {"smollm2", "act_cache_dir", "series"}


def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """The offline default model (dequantised once into the user cache, then ~1 s per load)."""
    from saekit.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def act_cache_dir(tmp_path_factory):
    """One activation cache folder shared by the pipeline tests (harvest once)."""
    return tmp_path_factory.mktemp("act_cache")


@pytest.fixture
def tiny(act_cache_dir):
    """CLI args of a run that takes seconds: 2 epochs over ~6k tokens of layer-2 activations."""
    return ["--hookpoints", "blocks.2.hook_resid_post", "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len",
            "64", "--epochs", "2", "--expansion", "2", "--k", "16", "--batch_size", "500", "--checkpoint_every", "4",
            "--log_every", "1", "--eval_contexts", "2", "--cache_dir", str(act_cache_dir), "--dead_tokens", "3000"]

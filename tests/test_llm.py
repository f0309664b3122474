"""The llama.cpp runner's lifetime: after close() every method refuses, instead of touching freed memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radixpert.config import get_config
from radixpert.errors import ModelError
from radixpert.runtime.llm import LlamaRunner


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """The tiny random Gemma 3 as an f32 GGUF."""
    from radixpert.export.gguf import write_gguf
    from radixpert.hf_models import build_tiny_llm
    from radixpert.tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-hf")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llm(get_config("tiny"), vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return write_gguf(folder, folder / "tiny-f32.gguf", "f32")


CALLS = {
    "tokenize": lambda r: r.tokenize("<bos>Derrame pleural"),
    "detokenize": lambda r: r.detokenize([10, 11]),
    "token_bytes": lambda r: r.token_bytes(10),
    "is_end_of_generation": lambda r: r.is_end_of_generation(1),
    "reset": lambda r: r.reset(),
    "trim": lambda r: r.trim(0),
    "eval_tokens": lambda r: r.eval_tokens([2, 10]),
    "eval_embeddings": lambda r: r.eval_embeddings(np.zeros((2, r.n_embd), np.float32)),
    "start": lambda r: r.start([2, 10]),
    "generate": lambda r: r.generate([2], np.zeros((3, r.n_embd), np.float32), [10], max_new_tokens=2),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_method_works_open_and_refuses_after_close(gguf, name):
    runner = LlamaRunner(gguf, n_ctx=64, threads=1, gpu_layers=0)
    CALLS[name](runner)
    runner.close()
    assert runner.closed
    with pytest.raises(ModelError, match="the LLM runner is closed"):
        CALLS[name](runner)


def test_close_twice_and_after_the_with_block_is_harmless(gguf):
    with LlamaRunner(gguf, n_ctx=64, threads=1, gpu_layers=0) as runner:
        assert runner.tokenize("<bos>") == [2]
    runner.close()
    runner.close()
    with pytest.raises(ModelError, match="closed"):
        runner.tokenize("<bos>")
    del runner  # __del__ closes again: nothing to free twice


def test_a_runner_that_failed_to_open_closes_cleanly(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        LlamaRunner(tmp_path / "missing.gguf")


def test_bf16_cache_type_is_ggmls_enum_value():
    """llama-cpp-python exports no BF16 constant; ours must be ggml's, as the gguf library has it."""
    import gguf as gguf_library

    from radixpert.runtime.llm import GGML_TYPE_BF16

    assert GGML_TYPE_BF16 == int(gguf_library.GGMLQuantizationType.BF16)


def test_unknown_attention_mode_is_refused_before_loading(tmp_path):
    with pytest.raises(ModelError, match="unknown attention mode 'fast'; use one of rows, matmul, flash"):
        LlamaRunner(tmp_path / "missing.gguf", attention="fast")

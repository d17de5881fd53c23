import pytest

from llm_local.backends.llama_cpp.library import library
from llm_local.backends.llama_cpp.sampling import SamplerChain
from llm_local.core.types import SamplingOptions

VOCAB = 49_152


def chain_names(sampling: SamplingOptions) -> list[str]:
    lib = library()
    chain = SamplerChain(lib, sampling, VOCAB)
    try:
        count = lib.llama_sampler_chain_n(chain.handle)
        return [
            lib.llama_sampler_name(lib.llama_sampler_chain_get(chain.handle, i)).decode()
            for i in range(count)
        ]
    finally:
        chain.free()


@pytest.mark.parametrize(
    ("sampling", "names"),
    [
        (SamplingOptions(), ["greedy"]),
        (SamplingOptions(temperature=0.7, seed=1), ["temp", "dist"]),
        (SamplingOptions(temperature=0.7, top_k=40, seed=1), ["top-k", "temp", "dist"]),
        (SamplingOptions(temperature=0.7, top_p=0.9, seed=1), ["top-p", "temp", "dist"]),
        (
            SamplingOptions(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=1),
            ["penalties", "top-k", "top-p", "temp", "dist"],
        ),
    ],
)
def test_the_chain_holds_only_cuts_that_cut(sampling: SamplingOptions, names: list[str]) -> None:
    # top_k 0 and top_p 1 keep every token; a top-k over the whole vocabulary would sort it
    # every token for nothing.
    assert chain_names(sampling) == names

"""treebatch: offline, large-batch LLM inference planned globally over a prefix tree."""

from treebatch.outputs import CompletionOutput, Logprob, RequestOutput
from treebatch.sampling_params import SamplingParams
from treebatch.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch; import it on first use so `treebatch.core` users stay torch-free.
    if name == "LLM":
        from treebatch.llm import LLM

        return LLM
    raise AttributeError(f"module 'treebatch' has no attribute {name!r}")

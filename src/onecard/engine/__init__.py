"""onecard's inference engine: paged KV cache, continuous batching, CUDA-graph decode, vLLM-shaped API."""

from onecard.engine.async_engine import AsyncEngine
from onecard.engine.config import EngineConfig
from onecard.engine.llm import LLM
from onecard.engine.outputs import CompletionOutput, RequestOutput
from onecard.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "RequestOutput", "SamplingParams"]

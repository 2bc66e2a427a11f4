"""The pdserve engine: paged KV cache, continuous batching, model runner.

``from engine import LLM, SamplingParams`` for offline generation;
:class:`EngineCore` for a worker's step loop.
"""

from common.sampling import SamplingParams
from engine.core import EngineCore
from engine.llm import LLM
from engine.output import RequestOutput
from engine.request import RequestMode, TokenLogprobs

__all__ = ["LLM", "EngineCore", "RequestMode", "RequestOutput", "SamplingParams", "TokenLogprobs"]

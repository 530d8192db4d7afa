"""Stand-in for ``vllm.sampling_params``."""

from dataclasses import dataclass

from vllm import SamplingParams  # noqa: F401  (same place as in vLLM)


@dataclass
class StructuredOutputsParams:
    json: object = None
    regex: str | None = None

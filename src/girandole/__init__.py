"""girandole: a self-hosted inference server that speaks Fireworks AI's inference API."""

from girandole.sampling.params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine; import it lazily so `import girandole` stays cheap.
    if name == "LLM":
        from girandole.llm import LLM

        return LLM
    raise AttributeError(name)

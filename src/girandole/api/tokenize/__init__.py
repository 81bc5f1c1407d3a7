"""POST /tokenize and /detokenize (vLLM's tokenizer endpoints, also under /v1 and
/inference/v1), wired into the app by `install_tokenize`."""

from girandole.api.tokenize.route import install_tokenize

__all__ = ["install_tokenize"]

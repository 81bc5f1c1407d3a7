"""Tokenizers for girandole: loading (GGUF or Hugging Face folder), incremental detokenization,
stop strings and chat templates.

    from girandole.tokenizer import load_tokenizer, IncrementalDetokenizer, StopStringMatcher
    tok = load_tokenizer(path)        # .gguf file, HF folder, or None for the default model
    ids = tok.encode("<start_of_turn>user\\nHi<end_of_turn>\\n")   # BOS added per metadata
    det = IncrementalDetokenizer(tok, prompt_ids=ids)
    stop = StopStringMatcher(["\\n\\n"])
    text, stopped = stop.feed(det.add([new_id]))
"""

from girandole.tokenizer.detokenizer import IncrementalDetokenizer
from girandole.tokenizer.loader import load_tokenizer
from girandole.tokenizer.stop import StopStringMatcher
from girandole.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "Tokenizer", "load_tokenizer"]

"""Tokenizers for girandole: loading (GGUF or Hugging Face folder), incremental detokenization,
stop strings and chat templates.

    from girandole.tokenizer import load_tokenizer, IncrementalDetokenizer, StopStringMatcher
    tok = load_tokenizer(path)        # .gguf file, HF folder, or None for the default model
    ids = tok.encode("<start_of_turn>user\\nHi<end_of_turn>\\n")   # BOS added per metadata
    det = IncrementalDetokenizer(tok, prompt_ids=ids)
    stop = StopStringMatcher(["\\n\\n"])
    text, stopped = stop.feed(det.add([new_id]))
    prompt = render_chat_for(tok, messages)   # model's template or the built-in for its family
"""

from girandole.tokenizer.chat_template import (
    ChatTemplateError,
    encode_chat,
    load_chat_template,
    render_chat,
    render_chat_for,
)
from girandole.tokenizer.detokenizer import IncrementalDetokenizer
from girandole.tokenizer.loader import load_tokenizer
from girandole.tokenizer.stop import StopStringMatcher
from girandole.tokenizer.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "encode_chat",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "load_chat_template",
    "load_tokenizer",
    "render_chat",
    "render_chat_for",
]

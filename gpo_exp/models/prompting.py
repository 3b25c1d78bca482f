"""Turn a benchmark prompt into model input: chat-template it (instruct models) or pass it through.

Token ids follow HF's `apply_chat_template(tokenize=True)` convention: templated text already holds
its special tokens (BOS, role markers), so it is encoded without adding more; plain text gets the
tokenizer's usual specials.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedTokenizerBase


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> bool:
    """True when the prompt will be wrapped: asked for and the tokenizer has a template."""
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str, use_chat_template: bool) -> str:
    """The string to tokenize: `text` as one user turn plus the assistant header, or `text` itself."""
    if not uses_chat_template(tokenizer, use_chat_template):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, use_chat_template: bool) -> list[int]:
    """Token ids of `format_prompt(...)`, with exactly one leading BOS when the tokenizer uses one."""
    templated = uses_chat_template(tokenizer, use_chat_template)
    ids = list(tokenizer(format_prompt(tokenizer, text, use_chat_template), add_special_tokens=not templated)
               ["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # a template that writes BOS on top of an added one
        ids = ids[1:]
    return ids

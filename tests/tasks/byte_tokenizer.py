"""A byte-level stand-in tokenizer for the tiny random models (vocabulary 256): one token per UTF-8 byte.

It offers what the text tasks use of a Hugging Face tokenizer: ``__call__`` (``.input_ids``), ``decode``,
``bos_token_id`` / ``eos_token_id`` and, for ``ChatByteTokenizer``, a chat template.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class ByteTokenizer:
    chat_template = None
    bos_token = None
    bos_token_id = None
    eos_token_id = 0  # NUL never occurs in the task texts

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **_):
        ids = list(text.encode("utf-8"))
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if int(i) != 0).decode("utf-8", errors="replace")


class ChatByteTokenizer(ByteTokenizer):
    chat_template = "user/assistant"

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return text + ("<assistant>\n" if add_generation_prompt else "")

"""Tokenizer and chat template, read from the checkpoint (transformers' tokenizer classes, nothing else)."""

from __future__ import annotations

from pathlib import Path

from specmtp.errors import SpecMTPError


class Tokenizer:
    def __init__(self, path: Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise SpecMTPError(f"cannot read a tokenizer from {path}: {e}") from None
        eos = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))

    @property
    def vocab(self) -> dict[str, int]:
        return self.hf.get_vocab()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: list[dict[str, str]] | str) -> list[int]:
        """Apply the checkpoint's chat template (with the assistant turn opened) and tokenize."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.has_chat_template:
            raise SpecMTPError("this checkpoint has no chat template: use a plain prompt instead of chat")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

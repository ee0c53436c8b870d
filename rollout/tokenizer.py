"""Text <-> token ids for model directories that ship a `tokenizer.json` (HF fast-tokenizer format),
and the chat template of `tokenizer_config.json` (rendered by transformers, then encoded here, as
vLLM does: the template writes any special tokens itself)."""

from __future__ import annotations

from pathlib import Path


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json: pass token ids instead of text")
        self._tok = Tokenizer.from_file(str(path))
        self._hf = None  # transformers tokenizer, loaded on the first chat template

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """One token as text (what a log-prob entry shows for it)."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            **template_kwargs) -> list[int]:
        """The conversation rendered by the model's chat template (or `chat_template`), as ids.
        Raises ValueError when there is no template or it cannot render these messages."""
        if self._hf is None:
            from transformers import AutoTokenizer
            self._hf = AutoTokenizer.from_pretrained(str(self.model_dir))
        if chat_template is None and not self._hf.chat_template:
            raise ValueError(f"{self.model_dir.name} has no chat template (tokenizer_config.json "
                             "'chat_template'): send chat_template or use /v1/completions")
        try:
            text = self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                continue_final_message=continue_final_message,
                                                chat_template=chat_template, **template_kwargs)
        except Exception as e:  # noqa: BLE001 - jinja errors are the caller's messages or template
            raise ValueError(f"messages: the chat template could not render them: {e}") from None
        return self.encode(text)

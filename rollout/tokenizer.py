"""Text <-> token ids for model directories that ship a `tokenizer.json` (HF fast-tokenizer format),
and the chat template of `tokenizer_config.json` (rendered by transformers, then encoded here, as
vLLM does: the template writes any special tokens itself).

Rendering is bounded in time and output size (`RenderLimits`): a template is a program, and the
one a request brings (when the server trusts request templates at all) or a model's own over
hostile messages could otherwise loop or build strings without end on a server thread.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class TemplateLimitError(ValueError):
    """Rendering a chat template went past its time or output-size bound."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    seconds: float = 2.0        # wall-clock time of one rendering
    max_chars: int = 4_000_000  # characters the template may write


@contextmanager
def _bounded(limits: RenderLimits):
    """Raises TemplateLimitError inside a jinja template's code (on this thread) once it has run
    `limits.seconds` or written `limits.max_chars` characters. Jinja compiles a template to Python
    whose render functions are generators in "<template>": a trace hook sees each line they run
    (loops included, even without a call) and each chunk they yield (a 'return' event carrying it).
    Nested blocks yield their chunks again through their parent, so output is over-counted, never
    under-counted. Not bounded: one expression's own work (a single `'x' * 10**9`); a Python
    string repetition cannot be interrupted from a trace hook."""
    deadline, written = time.monotonic() + limits.seconds, 0

    def check():
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template ran longer than {limits.seconds:g} s")

    def in_template(frame, event, arg):
        nonlocal written
        if event == "return" and isinstance(arg, str):
            written += len(arg)
            if written > limits.max_chars:
                raise TemplateLimitError(f"the chat template wrote more than {limits.max_chars} characters")
        check()
        return in_template

    def on_call(frame, event, arg):
        check()
        return in_template if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


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
                            limits: RenderLimits = RenderLimits(), **template_kwargs) -> list[int]:
        """The conversation rendered by the model's chat template (or `chat_template`), as ids.
        Raises ValueError when there is no template or it cannot render these messages, and
        TemplateLimitError when rendering goes past `limits`."""
        if self._hf is None:
            from transformers import AutoTokenizer
            self._hf = AutoTokenizer.from_pretrained(str(self.model_dir))
        if chat_template is None and not self._hf.chat_template:
            raise ValueError(f"{self.model_dir.name} has no chat template (tokenizer_config.json "
                             "'chat_template'): send chat_template or use /v1/completions")
        try:
            with _bounded(limits):
                text = self._hf.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, chat_template=chat_template, **template_kwargs)
        except TemplateLimitError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja errors are the caller's messages or template
            raise ValueError(f"messages: the chat template could not render them: {e}") from None
        return self.encode(text)

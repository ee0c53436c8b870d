"""Request bodies of the HTTP front end: vLLM's field names and defaults (`http.py` serves them),
and how a body becomes one (`parse_body`, run off the event loop).

Unknown fields are ignored, as vLLM does; the fields in UNSUPPORTED are known and refused unless
they ask for nothing. A body is strict JSON (no NaN / Infinity) whose strings are all valid
Unicode (no lone surrogate, which no tokenizer or JSON encoder takes); chat roles are the known
ones, so a role cannot smuggle a newline and a fake header into the rendered prompt.
"""

from __future__ import annotations

import json
import math
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# Roles a chat message may have (OpenAI's and vLLM's); anything else is a 400.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
Body = TypeVar("Body", bound=BaseModel)

# Fields the engine cannot honour -> the values that ask for nothing; anything else is a 400.
UNSUPPORTED = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "min_tokens": (None, 0), "use_beam_search": (None, False), "length_penalty": (None, 1),
    "prompt_logprobs": (None,), "logprob_token_ids": (None,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "response_format": (None, {"type": "text"}), "structured_outputs": (None,), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,), "tools": (None, []),
    "truncate_prompt_tokens": (None,), "prompt_embeds": (None,),
}


class SamplingFields(BaseModel):
    """Sampling fields shared by the generation routes (vLLM's names and defaults)."""
    model_config = ConfigDict(extra="allow")
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    sampler: str = "lossless"    # ours: lossless | mixed | ar
    mix_weight: float = 0.5      # ours: w of the mixed sampler
    seed_stable: bool = True     # ours: a seed's tokens are ar's whatever the drafts (SamplingParams)
    timeout_seconds: float | None = None  # ours: absent = the server's request timeout; else finite and > 0


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None


class ChatRequest(SamplingFields):
    model: str | None = None
    messages: list[dict] | None = None
    tokens: list[int] | None = None  # prime-rl / verifiers: the exact prompt ids of the conversation
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None


class TokenSampling(SamplingFields):
    logprobs: int | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    token_ids: list[int]
    sampling_params: TokenSampling = TokenSampling()
    stream: bool = False
    request_id: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str | None = None
    messages: list[dict] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The JSON body `raw` as `model`; ValueError naming the field for anything malformed. Runs
    on a worker thread: a large body (within the route's size limit) costs the event loop nothing."""
    fields = json_object(raw)
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValueError(f"{where}: {first['msg']}") from None


class _NotANumber:
    """Where the body held NaN, Infinity or a number too large for a float (refused by check_text,
    which knows the field)."""

    def __init__(self, text: str):
        self.text = text


def _number(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NotANumber(text)


def json_object(raw: bytes) -> dict:
    """A body as a JSON object (empty: {}), strictly: every number finite (no NaN / Infinity), no
    lone surrogate in any string."""
    try:
        fields = json.loads(raw, parse_constant=_NotANumber, parse_float=_number) if raw.strip() else {}
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"the body is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError("the body must be a JSON object")
    check_text(fields, "")
    return fields


def check_text(value, where: str) -> None:
    """Every number in a decoded JSON value is finite, and every string encodable as UTF-8: JSON's
    \\ud800 escapes can carry a lone surrogate, which the tokenizer and the response encoder
    would fail on (a 500)."""
    if isinstance(value, _NotANumber):
        raise ValueError(f"{where or 'body'} must be a finite number, got {value.text}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where or 'body'} holds a lone surrogate (\\u{ord(value[e.start]):04x}) at "
                             f"character {e.start}: not valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        if value and all(type(v) is int for v in value):  # token ids: the common large case
            return
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


def check_seconds(value, field: str) -> float:
    """A timeout a caller gave: a finite number > 0 (leave the field out for the default)."""
    if isinstance(value, _NotANumber):
        raise ValueError(f"{field} must be a finite number of seconds > 0, got {value.text}")
    if isinstance(value, str):
        try:
            value = float(value)  # query parameters arrive as text
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a finite number of seconds > 0 (leave it out for the default), "
                         f"got {value!r}")
    return float(value)


def check_message(m, i: int) -> dict:
    """A chat message whose role is a known one and whose content is text (a string, or text
    parts joined), as chat templates expect."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ValueError(f"messages[{i}] must be an object with a string 'role'")
    if m["role"] not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}")
    name = m.get("name")
    if name is not None and (not isinstance(name, str) or any(ch < " " for ch in name)):
        raise ValueError(f"messages[{i}].name must be a string without control characters (newlines included)")
    content = m.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise ValueError(f"messages[{i}].content: only text parts are supported")
        content = "".join(p.get("text", "") for p in content)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
    return dict(m, content=content if content is not None else "")

"""Request bodies of the HTTP front end: vLLM's field names and defaults (`http.py` serves them).

Unknown fields are ignored, as vLLM does; the fields in UNSUPPORTED are known and refused unless
they ask for nothing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

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
    timeout_seconds: float | None = None  # ours, as in gRPC: 0 / absent = the server's request timeout


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

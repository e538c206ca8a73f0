"""Request bodies (pydantic; they make the OpenAPI document) and their conversion into a `Turn`.

Fields follow OpenAI's. Extensions: ``session`` (or the ``X-Session-Id`` header), ``append``, ``resync``,
and the samplers OpenAI lacks (``top_k``, ``min_p``, ``repetition_penalty``). Unknown fields are ignored,
as OpenAI clients send many; fields we cannot honour (``n`` > 1, ``logprobs``, tools, ...) accept only
their "off" value, so the OpenAPI document says what works.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..sampling import SamplingConfig
from .engine import Turn
from .errors import ApiError, bad_request
from .sessions import check_id


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="1-64 of A-Z a-z 0-9 _ -")]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def plain(self) -> dict:
        """{"role", "content": str}: parts joined, developer treated as system."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(Body):
    type: Literal["text"]


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """Fields shared by both completion endpoints."""
    model: str | None = Field(None, description="the served model's id (GET /v1/models); default: that one")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="extension")
    min_p: float | None = Field(None, ge=0, lt=1, description="extension")
    # above 0.01: a tinier divisor turns the logits of recent tokens into inf, and sampling into NaN
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="extension")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Annotated[Text, Field(max_length=256)] | Annotated[list[Annotated[Text, Field(max_length=256)]],
                                                               Field(max_length=4)] | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False, 0] | None = Field(None, description="not supported")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported")
    user: str | None = None
    session: SessionId | None = Field(None, description="continue this server session (or X-Session-Id header)")


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    append: bool = Field(False, description="with a session: messages hold only the new turn")
    resync: bool = Field(False, description="with a session: rebuild it from messages if they disagree with it")
    tools: list[dict] | None = Field(None, max_length=0, description="not supported")
    tool_choice: Literal["none", "auto"] | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: Literal[0] | None = Field(None, description="not supported")


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    echo: Literal[False] = Field(False, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: Literal[""] | None = Field(None, description="not supported")


class SessionCreate(Body):
    id: SessionId | None = Field(None, description="default: a new random id")
    system: Text | None = Field(None, description="system prompt for the conversation")
    pin_system: bool | None = Field(None, description="keep the system prompt for ever: its tokens become the "
                                                      "cache's sinks, never evicted (default: the server's "
                                                      "--pin-system)")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096            # per request
    max_prompt_tokens: int = 32768    # new tokens per request
    max_body_bytes: int = 4 << 20
    max_queue: int = 8
    max_batch: int = 8                # requests generating at once, their forward passes batched
    prefill_budget: int = 256         # most prompt tokens per batched step beside decoding requests
    max_live: int = 8
    max_sessions: int = 1000


def to_turn(req: Sampling, *, kind: str, header_session: str | None, defaults: SamplingConfig, limits: Limits,
            model_id: str) -> Turn:
    """Check what pydantic cannot (server limits, unsupported options) and build the worker's `Turn`."""
    if req.model is not None and req.model != model_id:
        raise ApiError(404, f"model {req.model!r} not found; this server runs {model_id!r}", param="model",
                       code="model_not_found")
    session = req.session
    if header_session is not None:
        check_id(header_session)
        if session is not None and session != header_session:
            raise bad_request("the session in the body and the X-Session-Id header differ", param="session")
        session = header_session
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(256, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                          param="max_tokens", code="max_tokens_too_large")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    temperature = defaults.temperature if req.temperature is None else req.temperature
    cfg = replace(
        defaults,
        temperature=0.0 if temperature < 1e-4 else temperature,  # tinier ones overflow the logits: greedy
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else req.top_k,
        min_p=defaults.min_p if req.min_p is None else req.min_p,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        seed=defaults.seed if req.seed is None else req.seed % 2**63)
    turn = Turn(kind=kind, max_tokens=max_tokens, sampling=cfg, reseed=req.seed is not None, stop=stop,
                session=session)
    if isinstance(req, ChatCompletionRequest):
        turn.messages = [m.plain() for m in req.messages]
        turn.append, turn.resync = req.append, req.resync
    else:
        turn.prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return turn

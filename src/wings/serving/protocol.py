"""The OpenAI chat-completions protocol: which request fields this server honours, and the response objects.

Field names come from the `openai` package's own request type (`CompletionCreateParamsBase`), responses are
built with its response types (`ChatCompletion`, `ChatCompletionChunk`, `CompletionUsage`), so nothing of the
API is re-typed here except the subset of the request this server validates strictly (pydantic) to give each
bad field a message that names it.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from openai.types.completion_usage import CompletionUsage
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, ValidationError, field_validator

from ..paths import lone_surrogate, surrogate_message
from .errors import bad_request

# Our extensions to the request (OpenAI clients pass them through `extra_body`).
EXTENSION_FIELDS = {"wings_router", "wings_prompt_router"}
# Accepted and without effect on the answer (bookkeeping fields of OpenAI's API).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                  "prompt_cache_retention", "prompt_cache_options", "verbosity", "reasoning_effort",
                  "parallel_tool_calls"}
# OpenAI fields whose default we can honour but whose other values we cannot: (field, allowed default values).
UNSUPPORTED_UNLESS_DEFAULT = {
    "n": (1, None), "logprobs": (False, None), "top_logprobs": (0, None), "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "moderation": (None,),
}
KNOWN_FIELDS = set(CompletionCreateParamsBase.__annotations__) | {"stream"}
MAX_STOP_SEQUENCES = 16
# `seed` seeds a torch generator, which takes a 64-bit value: the signed 64-bit range (OpenAI's and vLLM's).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# A temperature below this samples as greedy decoding does (its limit), without dividing logits by ~0: as in vLLM.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Numbers are typed strictly: "3" is not an integer, true is not 1, 2.0 is not an integer (OpenAI's API agrees).
Number = Annotated[float, Strict()]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The fields of a chat-completions request that change the answer, each range-checked here (a 400 names it).

    `temperature` in [0, 2] (0, and anything below `GREEDY_BELOW_TEMPERATURE`, decodes greedily), `top_p` in
    (0, 1], `seed` a signed 64-bit integer, `max_tokens` >= 1 and within the context (checked once the prompt is
    tokenized), at most `MAX_STOP_SEQUENCES` non-empty stop strings.
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    wings_router: StrictBool = False
    wings_prompt_router: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if value is not None and value <= 0:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{field} must be at least 1, got {value}", param=field)
        return value


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong with it: not JSON (NaN and Infinity are not
    JSON either), nested too deeply, an integer too long to read, or text that is not Unicode (a lone surrogate,
    named by its field: no tokenizer or UTF-8 response can carry it)."""
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise bad_request("the request body is JSON nested too deeply to read") from None
    except ValueError as err:  # NaN / Infinity, or an integer of more digits than Python converts (4300)
        if "integer string conversion" in str(err):
            raise bad_request("the request body holds an integer with more than 4300 digits") from None
        raise bad_request(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    found = lone_surrogate(body)
    if found:
        raise bad_request(surrogate_message(found), param=found[0], code="invalid_unicode")
    return body


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_chat_request(body: dict) -> ChatRequest:
    """Check every field against what this server honours; a 400 names the first field that is wrong."""
    request = validate_body(body, ChatRequest, KNOWN_FIELDS | EXTENSION_FIELDS, UNSUPPORTED_UNLESS_DEFAULT)
    request.requested_max_tokens  # noqa: B018  (raises a 400 for max_tokens <= 0)
    return request


def validate_body(body: dict, model: type[BaseModel], known: set[str], unsupported: dict[str, tuple]) -> BaseModel:
    """`body` as `model`, or a 400 naming the first field that is unknown, set to a value this server does not
    support (anything but the defaults in `unsupported`), or invalid."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for field, defaults in unsupported.items():
        if field in body and not any(_same(body[field], d) for d in defaults):
            what = "one choice per request (n=1)" if field == "n" else f"the default {field} only"
            raise bad_request(f"{field}={json.dumps(body[field])[:80]} is not supported: this server returns "
                              f"{what}", param=field, code="unsupported_parameter")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise bad_request(describe_validation_error(err), param=_param(err)) from None


def _same(value, default) -> bool:
    """JSON equality: `true` is not `1` (Python's `True == 1` would let `"n": true` pass as n=1)."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem (at most three), each naming the field path, e.g. `messages[0].role: ...`."""
    lines = []
    for problem in _deduplicated(err.errors(include_url=False))[:3]:
        lines.append(f"{_path(problem['loc'])}: {problem['msg']}")
    return "; ".join(lines) or "invalid request"


def _deduplicated(problems: list[dict]) -> list[dict]:
    # `content` is a union (string or list of parts): report the list branch when the value is a list, since the
    # string branch's "Input should be a valid string" says nothing useful there.
    kept = [p for p in problems if not (p["loc"] and "content" in p["loc"] and p["type"] == "string_type"
                                        and isinstance(p.get("input"), list))]
    return kept or problems


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[tagged-union[TextPart,ImagePart]]") or "function-" in str(part):
            continue  # pydantic's name for a union branch, not a field
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _param(err: ValidationError) -> str | None:
    problems = err.errors(include_url=False)
    return _path(problems[0]["loc"]) if problems else None


# --- responses ----------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def completion(request_id: str, model: str, content: str, finish_reason: str, use: CompletionUsage,
               extension: dict | None = None) -> dict:
    message = ChatCompletionMessage(role="assistant", content=content)
    body = ChatCompletion(id=request_id, created=int(time.time()), model=model, object="chat.completion",
                          choices=[Choice(index=0, message=message, finish_reason=finish_reason)],
                          usage=use).model_dump(exclude_none=True)
    if extension:
        body["wings"] = extension
    return body


def chunk(request_id: str, model: str, created: int, content: str | None = None, role: str | None = None,
          finish_reason: str | None = None, use: CompletionUsage | None = None, extension: dict | None = None,
          no_choices: bool = False) -> str:
    """One server-sent event holding a `chat.completion.chunk`."""
    choices = [] if no_choices else [ChunkChoice(index=0, delta=ChoiceDelta(role=role, content=content),
                                                 finish_reason=finish_reason)]
    body = ChatCompletionChunk(id=request_id, created=created, model=model, object="chat.completion.chunk",
                               choices=choices, usage=use).model_dump(exclude_none=True)
    if no_choices:
        body["choices"] = []
    if extension:
        body["wings"] = extension
    return sse(body)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

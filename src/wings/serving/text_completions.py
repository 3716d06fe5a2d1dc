"""The `/v1/completions` route's answer: each prompt a ticket of its own in the scheduler, the choices gathered
(or one prompt's text streamed), `logprobs` and `echo` rendered the OpenAI way (completions.py)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .completions import CompletionRequest, completion_body, logprobs_body, prepare_completions
from .decoding import Failure
from .inputs import ServedModel
from .protocol import sse
from .scheduler import Scheduler, Ticket


async def answer_completions(parsed: CompletionRequest, served: ServedModel, scheduler: Scheduler,
                             request: Request, arrival: float):
    from .app import wait_event

    access = request.state.access
    access.model, access.stream = served.name, parsed.stream
    with scheduler.preparing():
        prepared = await run_in_threadpool(prepare_completions, served, parsed)
        loop = asyncio.get_running_loop()
        tickets = [scheduler.submit(p, loop, arrival) for p in prepared]
    tokenizer = served.processor.tokenizer
    prompt_texts = [tokenizer.decode(p.input_ids) if parsed.echo else "" for p in prepared]
    if parsed.stream:
        return StreamingResponse(_stream(tickets[0], parsed, served, prompt_texts[0], access),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, texts, finishes = [], [], []
    try:
        for ticket in tickets:
            text, finish = [], None
            while finish is None:
                event = await wait_event(ticket, request)
                if isinstance(event, Failure):
                    raise event.error
                text.append(event.text)
                finish = event.finish_reason
            texts.append("".join(text))
            finishes.append(finish)
    finally:
        for ticket in tickets:
            ticket.cancel()
            access.note_ticket(ticket, None if ticket.done else "abort")
    for i, ticket in enumerate(tickets):
        choice = {"index": i, "text": prompt_texts[i] + texts[i], "finish_reason": finishes[i], "logprobs": None}
        if parsed.logprobs is not None:
            choice["logprobs"] = logprobs_body(tokenizer, ticket, parsed.echo, parsed.logprobs)
        choices.append(choice)
    access.finish_reason = finishes[-1] if finishes else None
    body = completion_body(_id(tickets[0]), served.name, choices, sum(p.prompt_tokens for p in prepared),
                           sum(t.times.tokens for t in tickets))
    return JSONResponse(body)


def _id(ticket: Ticket) -> str:
    return ticket.id.replace("chatcmpl-", "cmpl-", 1)


async def _stream(ticket: Ticket, parsed: CompletionRequest, served: ServedModel, prompt_text: str, access):
    created, finish = int(time.time()), None
    rid = _id(ticket)

    def piece(text: str, finish_reason: str | None = None) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": served.name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]})

    try:
        if prompt_text:
            yield piece(prompt_text)
        while finish is None:
            event = await ticket.queue.get()
            if isinstance(event, Failure):
                access.error_status = event.error.status
                yield sse(event.error.body())
                break
            finish = event.finish_reason
            if event.text or finish:
                yield piece(event.text, finish)
        if finish is not None and parsed.stream_options is not None and parsed.stream_options.include_usage:
            prompt, completion = ticket.prepared.prompt_tokens, ticket.times.tokens
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": served.name,
                       "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                "total_tokens": prompt + completion}})
        yield sse("[DONE]")
    finally:
        ticket.cancel()
        access.note_ticket(ticket, finish if finish is not None else None if ticket.done else "abort")

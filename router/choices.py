"""Running the choices of one API request: start them, prime them, interleave their deltas.

Both front ends (HTTP and gRPC) turn one request into ``len(prompts) * n``
choices, each one ``Router.generate`` stream. ``start_choices`` creates them
and waits for every choice's first delta, so that admission and routing
errors surface before a response has begun (as a status, not a broken
stream). ``interleave`` then yields ``(choice, delta)`` in arrival order and,
however it ends (done, error, client gone), cancels and closes every choice,
which aborts its request on its worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from router.openai_protocol import CompletionRequest
from router.service import Delta, Router


@dataclass(slots=True)
class Choice:
    index: int
    prompt_index: int
    stream: AsyncIterator[Delta]
    first: Delta | None = None
    num_tokens: int = 0
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[Delta]:
        assert self.first is not None, "start_choices primes every choice"
        yield self.first
        if self.first.finish_reason is None:
            async for delta in self.stream:
                yield delta


async def start_choices(router: Router, req: CompletionRequest, response_id: str) -> list[Choice]:
    """Create and prime every choice; on any error (429 included) close them all and raise it."""
    choices = []
    for p_index, prompt in enumerate(req.prompts):
        for k in range(req.n):
            index = p_index * req.n + k
            sampling = req.sampling
            if sampling.seed is not None and index:
                sampling = replace(sampling, seed=sampling.seed + index)  # seeded choices still differ
            stream = router.generate(f"{response_id}-{index}", list(prompt), sampling)
            choices.append(Choice(index, p_index, stream))
    try:
        firsts = await asyncio.gather(*(anext(c.stream) for c in choices))
    except BaseException:
        await asyncio.gather(*(c.stream.aclose() for c in choices), return_exceptions=True)
        raise
    for c, first in zip(choices, firsts):
        c.first = first
    return choices


async def interleave(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Deltas of all choices as they come; raises the first error of any choice."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for delta in c.deltas():
                await queue.put((c, delta))
        except BaseException as e:  # noqa: BLE001 (re-raised to the consumer below)
            await queue.put((c, e))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            c, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stream.aclose() for c in choices), return_exceptions=True)

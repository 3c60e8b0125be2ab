"""The offline Python API, in the shape users know from vLLM.

    llm = kunjax.LLM("demo")                      # or a Hugging Face / kunjax checkpoint directory
    outs = llm.generate(["Fog rolled over the valley before sunrise and"], kunjax.SamplingParams(temperature=0))
    outs[0].text, outs[0].token_ids
    for out in llm.stream(["Fog rolled over the valley before sunrise and"], params):
        print(out.outputs[0].delta_text, end="")

Owns only the user-facing conveniences (prompt/param broadcasting, ordering, streaming iteration); everything
else is `LLMEngine`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import jax

from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.progress import warm_up
from kunjax.request import RequestOutput
from kunjax.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def _normalize(prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None
               ) -> list[tuple[Prompt, SamplingParams]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # one prompt: a string or one list of token ids
    prompts = list(prompts)
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * len(prompts)
    else:
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    return list(zip(prompts, params, strict=True))


class LLM:
    """`LLM(model, **engine_options)`; engine options are the fields of `kunjax.EngineConfig`."""

    def __init__(self, model: str | Path = "demo", *, devices: Sequence[jax.Device] | None = None,
                 warmup: bool = True, **engine_options):
        self.engine = LLMEngine(model, config_from_kwargs(**engine_options), devices=devices)
        if warmup:  # with a progress bar on stderr: a minute on CPU the first time
            warm_up(self.engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _submit(self, prompts, sampling_params) -> list[str]:
        ids = []
        try:
            for prompt, params in _normalize(prompts, sampling_params):
                ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for rid in ids:  # a bad prompt rejects the whole call; leave nothing half-submitted
                self.engine.abort(rid)
            raise
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs in prompt order."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            if not self.engine.has_unfinished():
                lost = [i for i in ids if i not in final]
                raise RuntimeError(f"requests {lost} left the engine without finishing")
            for out in self.engine.step().finished():  # the deltas are never built
                final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yield an output each time a request advances (`outputs[0].delta_text` holds the new text).

        Closing the iterator early aborts the requests that have not finished and frees their blocks.
        """
        ids = self._submit(prompts, sampling_params)
        remaining = set(ids)
        try:
            while remaining:
                for out in self.engine.step():
                    if out.request_id in remaining:
                        if out.finished:
                            remaining.discard(out.request_id)
                        yield out
        finally:
            for rid in remaining:
                self.engine.abort(rid)

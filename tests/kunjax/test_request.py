"""A step's outputs (`kunjax.request.StepOutputs`): deltas recorded at their step and built when read are the
outputs an eager engine would have returned then, whenever they are read; `finished()` is the final outputs."""

from __future__ import annotations

from kunjax.engine import LLMEngine, config_from_kwargs
from kunjax.request import RequestOutput, StepOutputs
from kunjax.sampling_params import SamplingParams
from tests.helpers import SPLIT

CONFIG = dict(num_instances=1, block_size=8, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
              max_model_len=64, min_token_bucket=16)


def run(read_at_once: bool) -> list[list[RequestOutput]]:
    """Three requests (one with logprobs, one stopping on a stop id, one by length); each step's outputs read
    right away, or kept unread until every request finished."""
    engine = LLMEngine(SPLIT, config_from_kwargs(**CONFIG), executor="arith")
    engine.warmup()
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [3] * 12]
    want = engine.executor.expected_greedy(prompts[1], 8)
    params = [SamplingParams(max_tokens=7, logprobs=2, temperature=0.0),
              SamplingParams(max_tokens=20, stop_token_ids=[want[4]], temperature=0.0),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)]
    for p, sp in zip(prompts, params, strict=True):
        engine.add_request(p, sp)
    steps: list[StepOutputs] = []
    read: list[list[RequestOutput]] = []
    while engine.has_unfinished():
        outs = engine.step()
        steps.append(outs)
        if read_at_once:
            read.append(list(outs))
    return read if read_at_once else [list(outs) for outs in steps]


def test_deltas_read_late_equal_deltas_read_at_once():
    at_once, late = run(True), run(False)
    assert at_once == late
    flat = [o for step in at_once for o in step]
    assert sum(o.finished for o in flat) == 3
    lp = [o for o in flat if o.outputs[0].delta_logprobs]
    assert lp and all(len(o.outputs[0].delta_logprobs[0]) >= 2 for o in lp)  # the sampled id and the top 2
    counts: dict[str, int] = {}
    for o in flat:  # tokens generated so far, as of that step's output
        counts[o.request_id] = counts.get(o.request_id, 0) + len(o.outputs[0].delta_token_ids)
        assert o.num_output_tokens == counts[o.request_id]
        assert o.outputs[0].finish_reason is None or o.finished


def test_finished_lists_the_final_outputs_without_building_deltas():
    engine = LLMEngine(SPLIT, config_from_kwargs(**CONFIG), executor="arith")
    engine.warmup()
    rid = engine.add_request([4, 5, 6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finals = []
    while engine.has_unfinished():
        outs = engine.step()
        finals += outs.finished()
        assert all(isinstance(item, tuple) for item in outs._items if item not in finals)  # deltas unbuilt
    assert [o.request_id for o in finals] == [rid] and finals[0].finished
    assert len(finals[0].outputs[0].token_ids) == 3
    outs = StepOutputs(finals)
    assert len(outs) == 1 and outs[0] is finals[0] and outs[:1] == finals and outs.finished() == finals



def test_tokens_gives_each_entrys_new_ids_and_final_output_without_building_deltas():
    def row(o: RequestOutput):
        return o.request_id, o.outputs[0].delta_token_ids, o if o.finished else None

    engine = LLMEngine(SPLIT, config_from_kwargs(**CONFIG), executor="arith")
    engine.warmup()
    for p in ([4, 5, 6], [7, 8], [9] * 10):
        engine.add_request(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    got, built = [], []
    while engine.has_unfinished():
        outs = engine.step()
        got += list(outs.tokens())
        assert all(isinstance(item, tuple) for item in outs._items if item not in outs.finished())  # unbuilt
        built += list(outs)
    assert got == [row(o) for o in built] and sum(final is not None for _, _, final in got) == 3
    outs = StepOutputs(built)  # outputs given whole (as a failure's or an abort's are) read the same way
    assert list(outs.tokens()) == [row(o) for o in built]

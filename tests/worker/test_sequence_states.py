"""The worker's sequence states follow the step contract: state after add / finish / preempt /
fork, and a replica fed pickled steps (as another process would be) stays identical to the
runner's own states through a real engine run."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.scheduler_output import NewSequenceData, ScheduledSequence, SchedulerOutput
from pagedllm.worker.sequence_states import SequenceStates
from tests.fixtures.tiny_models import random_prompts

CPU = torch.device("cpu")


def _new(sid: str, prompt: list[int], seed: int | None = None, index: int = 0) -> NewSequenceData:
    return NewSequenceData(sid, prompt, SamplingParams(temperature=1.0), seed, index)


def test_add_update_preempt_fork_finish() -> None:
    states = SequenceStates(CPU)
    states.apply(
        SchedulerOutput(
            new_sequences=[_new("a", [1, 2, 3], seed=5), _new("a#1", [1, 2, 3], index=1)],
            scheduled=[ScheduledSequence("a", 0, 3, [7], True, [], ["a", "a#1"])],
        )
    )
    a, child = states["a"], states["a#1"]
    assert a.token_ids == [1, 2, 3] and a.block_ids == [7] and a.generator is not None
    assert child.block_ids == [] and child.index == 1 and child.generator is None
    first = torch.rand(1, generator=a.generator).item()
    # Decode: the host learnt token 9; a new block appears.
    states.apply(SchedulerOutput(scheduled=[ScheduledSequence("a", 3, 1, [8], False, [9], ["a"])]))
    assert a.token_ids == [1, 2, 3, 9] and a.output_token_ids == [9] and a.block_ids == [7, 8]
    # Preempted, then resumed on other blocks: the table is replaced, the generator kept.
    states.apply(SchedulerOutput(preempted_seq_ids=["a"]))
    states.apply(
        SchedulerOutput(scheduled=[ScheduledSequence("a", 0, 5, [3, 4], True, [11], ["a"])])
    )
    assert a.block_ids == [3, 4] and a.token_ids == [1, 2, 3, 9, 11]
    assert torch.rand(1, generator=a.generator).item() != first  # the stream went on
    # The sibling joins the batch on its leader's prompt block, with its first token.
    states.apply(SchedulerOutput(scheduled=[ScheduledSequence("a#1", 3, 1, [7], True, [4])]))
    assert child.token_ids == [1, 2, 3, 4] and child.block_ids == [7]
    states.apply(SchedulerOutput(finished_seq_ids=["a", "a#1", "never-seen"]))
    assert len(states) == 0


class _Recorder:
    """Wraps a runner's ``execute_async``: pickles every step into a replica's states."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.replica = SequenceStates(CPU)
        self.steps = 0
        self._inner = runner.execute_async

    def __call__(self, step: SchedulerOutput) -> Any:
        copy = pickle.loads(pickle.dumps(step))
        assert copy == step
        self.replica.apply(copy)
        handle = self._inner(step)
        self.steps += 1
        mine, theirs = self.runner.states.seqs, self.replica.seqs
        assert mine.keys() == theirs.keys()
        for sid, s in mine.items():
            r = theirs[sid]
            assert (s.token_ids, s.block_ids, s.index) == (r.token_ids, r.block_ids, r.index)
            assert (s.generator is None) == (r.generator is None)
            if s.generator is not None:
                assert r.generator is not None
                r.generator.set_state(s.generator.get_state())  # same stream on both sides
        return handle


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_pickled_steps_rebuild_the_runner_states(
    llama_dir: Any, tiny_tokenizer: Any, async_scheduling: bool
) -> None:
    llm = LLM(
        str(llama_dir),
        async_scheduling=async_scheduling,
        max_num_seqs=4,
        max_num_batched_tokens=24,
        num_gpu_blocks=12,
        block_size=4,
    )
    runner = llm.llm_engine.runner
    recorder = _Recorder(runner)
    runner.execute_async = recorder
    prompts = random_prompts(len(tiny_tokenizer), 6, 20, 30, seed=4)
    params = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, repetition_penalty=1.2, ignore_eos=True),
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [params[i % 3] for i in range(len(prompts))],
        use_tqdm=False,
    )
    assert all(o.finished for o in outs) and recorder.steps > 10
    assert llm.llm_engine.scheduler.num_preemptions > 0  # the small pool forced preemption

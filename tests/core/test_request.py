"""Req: the scheduler's per-request state."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.core.request import Req


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=8),
    st.lists(st.integers(0, 9), max_size=8),
    st.data(),
)
def test_fill_range_is_a_slice_of_fill_ids(
    prompt: list[int], output: list[int], data: st.DataObject
) -> None:
    r = Req.from_message(GenerateRequest("r", prompt, SamplingParams()), (2,))
    r.output_ids = output
    n = len(prompt) + len(output)
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(start, n))
    assert r.fill_range(start, end) == r.fill_ids[start:end]


def test_eos_ids_are_the_models_then_the_requests_stop_ids() -> None:
    params = SamplingParams(stop_token_ids=(7, 2))
    assert Req.from_message(GenerateRequest("r", [1], params), (2, 3)).eos_ids == (2, 3, 7)
    no_eos = SamplingParams(stop_token_ids=(7,), ignore_eos=True)
    assert Req.from_message(GenerateRequest("r", [1], no_eos), (2, 3)).eos_ids == (7,)

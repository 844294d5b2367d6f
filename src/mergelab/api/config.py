"""`mergelab merge --config merge.yaml`: the merge command's YAML file (the same fields as its flags).

Unset options (None) take the route's defaults, so a file never passes a streaming option to a data-dependent method
or a data option to a weight-space one by accident.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import Field

from mergelab.core.config import StrictModel

OPTION_FIELDS = ("include", "exclude", "dtype", "max_shard_size", "allow_nonfinite", "max_length", "seed", "force")


class MergeConfig(StrictModel):
    """`mergelab merge --config merge.yaml`."""

    method: str = Field(description="merging method (see `mergelab methods`)")
    base: str | None = Field(default=None, description="pretrained base checkpoint")
    models: list[str] = Field(min_length=1, description="fine-tuned checkpoints (TASK=PATH, or PATH in task order)")
    out: str = Field(description="output folder")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters")
    data: list[str] = Field(
        default_factory=list,
        description="data-dependent methods: TASK=PATH per model (models then TASK=PATH too), or one PATH per model",
    )
    include: list[str] | None = Field(default=None, description="weight-space methods: regexes of tensors to merge")
    exclude: list[str] | None = Field(default=None, description="weight-space methods: regexes of tensors to keep")
    dtype: typing.Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] | None = None
    max_shard_size: str | None = Field(default=None, description="weight-space methods: e.g. 2GB (the default)")
    force: bool = False
    allow_nonfinite: bool = False
    max_length: int | None = Field(default=None, ge=2, description="data-dependent methods: tokens per input (DEFAULT_MAX_LENGTH, 64)")
    seed: int | None = Field(default=None, description="data-dependent methods: input sampling seed (0)")

    def options(self) -> dict[str, Any]:
        """The options that are set, as ``mergelab.merge`` keywords."""
        return {key: getattr(self, key) for key in OPTION_FIELDS if getattr(self, key) not in (None, False)}

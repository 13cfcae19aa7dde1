"""Option types shared by the command modules."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan``, ``inf`` and ``-inf``: NaN passes every
    bound check (each comparison with it is false) and infinity passes an open upper bound."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        converted = super().convert(value, param, ctx)
        if not math.isfinite(converted):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return converted


class ShardType(click.ParamType):
    """``I/N`` -> ``(I, N)`` with ``0 <= I < N`` (``embedx.shards.parse_shard``)."""

    name = "I/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from embedx.errors import ConfigError
        from embedx.shards import parse_shard

        if isinstance(value, tuple):
            return value
        try:
            return parse_shard(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)

"""The generation contract, as the model publishes it, and the gateway's copy of it.

The model owns the rules of a valid request (bounds, defaults, schedulers, size multiple,
default size, rows per request): its config.pbtxt parameters plus what the export copies
from the weights' manifest, served by Triton as the model config's parameters. The studio
styles it serves are published while it runs, so they come from the listing model beside it
(`stable_diffusion_styles`), read with the config at every refresh. The gateway reads them
from there, derives its request bodies, OpenAPI document and costs from them,
and restates none of them. It keeps the last contract it saw in Redis, so that it can start
and accept jobs while Triton is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.triton_client import AsyncTriton, ModelConfig, ModelError

log = logging.getLogger(__name__)

CONTRACT_VERSIONS = frozenset({1})  # the contract formats this gateway understands
STORED = "forge:contract:last"


class UnknownContract(Exception):
    """No contract has been seen yet: generation needs the model's rules."""


class BaseModelId(BaseModel):
    """The exported weights a style was imported for."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    version: str


class StyleInfo(BaseModel):
    """A published studio style (a LoRA), as its manifest describes it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    version: str = Field(description="content version: changes whenever its weights do")
    rank: int
    alphas: tuple[float, ...]
    source_format: str = Field(description="the file it was imported from: peft or kohya")
    modules: int = Field(description="the network layers it adapts")
    base_model: BaseModelId


class GenerationContract(BaseModel):
    """The model's rules for one image request, as the model config's parameters state them."""

    model_config = ConfigDict(frozen=True)

    contract_version: int
    model_name: str
    model_version: str
    schedulers: tuple[str, ...]
    default_scheduler: str
    min_size: int
    max_size: int
    size_multiple: int
    default_size: int
    min_steps: int
    max_steps: int
    default_steps: int
    min_guidance: float
    max_guidance: float
    default_guidance: float
    unguided_at_most: float
    max_prompt_chars: int
    max_prompt_tokens: int
    prompt_overflow: Literal["reject", "truncate"]
    max_seed: int
    min_strength: float
    max_strength: float
    default_strength: float
    min_style_weight: float
    max_style_weight: float
    default_style_weight: float
    max_rows: int
    styles: tuple[StyleInfo, ...] = ()

    def style(self, name: str) -> StyleInfo | None:
        """The published style `name` this model can serve (one imported for these weights)."""
        return next((s for s in self.servable_styles if s.name == name), None)

    def style_problem(self, name: str) -> str | None:
        """Why a request cannot name the style `name` (None: it can)."""
        if self.style(name) is not None:
            return None
        published = next((s for s in self.styles if s.name == name), None)
        if published is not None:
            base = published.base_model
            return (
                f"style {name!r} was imported for {base.name} version {base.version}; this "
                f"model serves {self.model_name} version {self.model_version}: import it again"
            )
        available = ", ".join(s.name for s in self.servable_styles) or "none"
        return f"unknown style {name!r}; styles available: {available}"

    @property
    def servable_styles(self) -> tuple[StyleInfo, ...]:
        """The published styles imported for the weights this model serves."""
        return tuple(s for s in self.styles if s.base_model.version == self.model_version)

    @classmethod
    def from_model_config(
        cls, config: ModelConfig, styles: list[dict[str, object]]
    ) -> GenerationContract:
        """Parse the model config's parameters and the styles listing; ValueError names what
        is missing or bad."""
        values: dict[str, object] = dict(config.parameters)
        values["max_rows"] = config.max_batch_size
        values["styles"] = styles
        values["schedulers"] = tuple(
            s.strip() for s in config.parameters.get("schedulers", "").split(",") if s.strip()
        )
        wanted = {name: values[name] for name in cls.model_fields if name in values}
        try:
            contract = cls.model_validate(wanted)
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"the model config is not a generation contract: {problems}") from exc
        if contract.contract_version not in CONTRACT_VERSIONS:
            raise ValueError(
                f"the model publishes contract version {contract.contract_version}; this "
                f"gateway reads {sorted(CONTRACT_VERSIONS)}"
            )
        return contract

    @property
    def fingerprint(self) -> str:
        """Changes whenever any rule or the model version changes."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class ContractBook:
    """The contract in force: read from Triton, remembered in Redis, refreshed periodically."""

    def __init__(self, triton: AsyncTriton, redis: Redis) -> None:
        self.triton, self.redis = triton, redis
        self._current: GenerationContract | None = None
        self._stored: str | None = None  # fingerprint of the contract last stored in Redis
        self._rechecked_at = float("-inf")  # the last `recheck` that read (time.monotonic())

    @property
    def current(self) -> GenerationContract:
        """The contract in force, or UnknownContract if none was ever seen."""
        if self._current is None:
            raise UnknownContract("the image model's rules are not known yet")
        return self._current

    @property
    def known(self) -> bool:
        """Whether any contract has been seen (now or in an earlier run)."""
        return self._current is not None

    def _adopt(self, contract: GenerationContract) -> None:
        if self._current is not None and contract.fingerprint == self._current.fingerprint:
            return
        log.info(
            "generation contract %s of model %s version %s",
            contract.fingerprint,
            contract.model_name,
            contract.model_version,
        )
        self._current = contract

    async def refresh(self) -> bool:
        """Read the contract from Triton (and store it); True if Triton answered."""
        try:
            config = await self.triton.model_config()
            contract = GenerationContract.from_model_config(config, await self._styles())
        except ModelError as exc:
            log.info("cannot read the model's contract from Triton: %s", exc.message)
            return False
        except ValueError as exc:
            log.error("%s", exc)
            return False
        self._adopt(contract)
        if self._stored != contract.fingerprint:
            try:
                await self.redis.set(STORED, contract.model_dump_json())
                self._stored = contract.fingerprint
            except RedisError as exc:
                log.warning("cannot store the contract in Redis yet (%r)", exc)
        return True

    async def recheck(self, every_s: float) -> bool:
        """Read the contract again for a request naming a style it does not list (published
        since the last read, perhaps), unless a recheck read it less than `every_s` ago;
        True if it was read."""
        if time.monotonic() - self._rechecked_at < every_s:
            return False
        self._rechecked_at = time.monotonic()
        return await self.refresh()

    async def _styles(self) -> list[dict[str, object]]:
        """The styles listing; while the listing model cannot answer (not loaded, or a
        deployment without it), the styles last seen, if any."""
        try:
            return await self.triton.styles()
        except ModelError as exc:
            log.warning("cannot read the styles the model serves: %s", exc.message)
            known = self._current.styles if self._current is not None else ()
            return [style.model_dump() for style in known]

    async def recall(self) -> bool:
        """The contract stored by an earlier run, when Triton cannot tell; True if found."""
        try:
            raw = await self.redis.get(STORED)
        except RedisError as exc:
            log.warning("cannot read the stored contract from Redis (%r)", exc)
            return False
        if raw is None:
            return False
        try:
            contract = GenerationContract.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring the stored contract: %s", exc)
            return False
        self._adopt(contract)
        return True

    async def load(self) -> None:
        """Read the contract from Triton; while none is known, recall the stored one."""
        if not await self.refresh() and not self.known:
            await self.recall()

    async def watch(self, every_s: float) -> None:
        """Load again every `every_s` seconds, forever (a background task)."""
        while True:
            await asyncio.sleep(every_s)
            await self.load()

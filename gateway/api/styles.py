"""`GET /v1/styles`: the studio styles (LoRAs) a request may name now, from the contract."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.api.deps import GenerateKey, ServicesDep
from gateway.api.http import problems
from gateway.contract import StyleInfo

router = APIRouter()


class StyleWeights(BaseModel):
    """The bounds and default of a request's `style_weight`."""

    min: float
    max: float
    default: float


class Styles(BaseModel):
    """The styles the model serves now, and how strongly a request may apply one."""

    styles: list[StyleInfo] = Field(
        description="by name; published and removed while the model runs, so this changes "
        "without a deploy (read again every FORGE_CONTRACT_REFRESH_S, and when a request "
        "names a style not listed)"
    )
    style_weight: StyleWeights


@router.get(
    "/v1/styles", response_model=Styles, tags=["generate"], responses=problems(401, 403, 503)
)
async def styles(svc: ServicesDep, _: GenerateKey) -> Styles:
    """The studio styles `style` may name on images, weapons and jobs."""
    contract = svc.contract.current
    return Styles(
        styles=list(contract.servable_styles),
        style_weight=StyleWeights(
            min=contract.min_style_weight,
            max=contract.max_style_weight,
            default=contract.default_style_weight,
        ),
    )

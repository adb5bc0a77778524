"""The image request bodies of the public API, built from the model's generation contract.

Bounds, defaults, the scheduler enum and the size multiple come from the contract the
model publishes, so the gateway refuses (422, before any charge) what the model would
refuse, and its OpenAPI document (which the forge page reads) states the model's rules.
A new contract (another model version, other rules) gives new bodies: the routes validate
each request against the bodies of the contract in force (`CurrentBodies`), and the OpenAPI
document is made again from them (`document`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, cast

from fastapi.exceptions import RequestValidationError
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from gateway.assets import KEY
from gateway.callback_urls import CallbackRules
from gateway.contract import ContractBook, GenerationContract
from gateway.schemas import Format, ImageSpec, JobOptions, JsonInt, Strict, bounded_int
from gateway.weapons import WeaponTemplates

log = logging.getLogger(__name__)
OPTIONS = (
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
    "format",
    "init_image",
    "strength",
    "style",
    "style_weight",
)
# An option that applies only with another: the schema's dependentRequired, and a 422.
NEEDS = {"strength": "init_image", "style_weight": "style"}


def _size(contract: GenerationContract, axis: str) -> Any:
    return Field(
        contract.default_size,
        ge=contract.min_size,
        le=contract.max_size,
        multiple_of=contract.size_multiple,
        description=f"image {axis} in pixels",
    )


def _style(contract: GenerationContract, default: str | None) -> Any:
    """The `style` field: one of the styles the model serves now (an enum), or none."""
    names = tuple(s.name for s in contract.servable_styles)
    choices = Literal[names] | None if names else None
    return (
        choices,
        Field(
            default if default in names else None,
            description="a studio style: a LoRA the model serves (GET /v1/styles lists them)",
        ),
    )


def _known_style(contract: GenerationContract) -> Any:
    """A validator that refuses a style the model does not serve, saying which it does."""

    def known(value: Any) -> Any:
        if isinstance(value, str):
            problem = contract.style_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    return field_validator("style", mode="before")(known)


def _options(contract: GenerationContract, default_style: str | None = None) -> dict[str, Any]:
    """Everything but the words, with the contract's bounds and defaults."""
    schedulers = Literal[tuple(contract.schedulers)]  # type: ignore[valid-type]
    return {
        "seed": (
            bounded_int(0, contract.max_seed) | None,
            Field(None, description="same seed and parameters, same image; random if absent"),
        ),
        "steps": (
            JsonInt,
            Field(
                contract.default_steps,
                ge=contract.min_steps,
                le=contract.max_steps,
                description="denoising steps",
            ),
        ),
        "guidance_scale": (
            float,
            Field(
                contract.default_guidance,
                ge=contract.min_guidance,
                le=contract.max_guidance,
                allow_inf_nan=False,
                description="prompt adherence; at most "
                f"{contract.unguided_at_most:g} skips the unconditional pass (half the cost)",
            ),
        ),
        "width": (JsonInt, _size(contract, "width")),
        "height": (JsonInt, _size(contract, "height")),
        "scheduler": (schedulers, Field(contract.default_scheduler)),
        "format": (Format, Field("png")),
        "init_image": (
            str | None,
            Field(
                None,
                pattern=KEY.pattern,
                description="image-to-image: the key of an image to start from (from POST "
                "/v1/uploads, or any image the forge made: refine it). Without width and "
                "height the result keeps its aspect ratio; it is fitted to the size given",
            ),
        ),
        "strength": _dependent_number(
            contract.min_strength,
            contract.max_strength,
            "with init_image: how far to move from it (0 keeps it, 1 ignores it); default "
            f"{contract.default_strength:g}. Runs steps x strength steps",
        ),
        "style": _style(contract, default_style),
        "style_weight": _dependent_number(
            contract.min_style_weight,
            contract.max_style_weight,
            "with style: how strongly it applies (0 is no style); default "
            f"{contract.default_style_weight:g}",
        ),
    }


def _dependent_number(low: float, high: float, description: str) -> Any:
    """An optional number within [low, high] that applies with another option (`NEEDS`): its
    default is resolved with that one, so the field has none."""
    return (
        float | None,
        Field(None, ge=low, le=high, allow_inf_nan=False, description=description),
    )


class ImageOptions(Strict):
    """The base of the contract's ImageRequest and WeaponRequest: a strength is sent with an
    init_image, a style_weight with a style (`NEEDS`; the schema says so as dependentRequired).
    With the one it needs sent as null (no input image, no style), an option is moot."""

    model_config = ConfigDict(
        json_schema_extra={"dependentRequired": {k: [v] for k, v in NEEDS.items()}}
    )

    @model_validator(mode="after")
    def _dependent_options(self) -> ImageOptions:
        for option, needed in NEEDS.items():
            if getattr(self, option, None) is not None and needed not in self.model_fields_set:
                raise ValueError(f"{option} applies to a {needed}; send one or leave it out")
        return self


def _words(contract: GenerationContract) -> dict[str, Any]:
    overflow = (
        "longer prompts get 422" if contract.prompt_overflow == "reject" else "the rest is dropped"
    )
    return {
        "prompt": (
            str,
            Field(
                min_length=1,
                max_length=contract.max_prompt_chars,
                pattern=r"\S",
                description=f"what to draw; at most {contract.max_prompt_tokens} CLIP tokens "
                f"({overflow})",
            ),
        ),
        "negative_prompt": (
            str,
            Field("", max_length=contract.max_prompt_chars, description="what to avoid"),
        ),
    }


def job_options(callbacks: CallbackRules | None) -> type[JobOptions]:
    """JobOptions with a `callback_url` following `callbacks` (none where callbacks are off).

    The pattern states what a URL must look like; a literal address is refused with its
    reason before the pattern is tried.
    """
    if callbacks is None:
        return JobOptions

    def text_rules(value: Any) -> Any:
        if isinstance(value, str):
            callbacks.check_text(value)  # UnsafeCallback is a ValueError: a 422 naming why
        return value

    return create_model(
        "JobOptions",
        __base__=JobOptions,
        __validators__={
            "callback_text": field_validator("callback_url", mode="before")(text_rules)
        },
        callback_url=(
            str | None,
            Field(
                None,
                max_length=2000,
                pattern=callbacks.pattern(),
                description="receives the finished job, signed with the API key's webhook "
                "secret as Standard Webhooks specifies; a public http(s) URL",
            ),
        ),
    )


class ImageJobBody(JobOptions):
    """An image job: its entries are the contract's ImageRequest (see RequestBodies)."""

    images: list[Strict]


class WeaponJobBody(JobOptions):
    """A weapon job: its entries are the contract's WeaponRequest (see RequestBodies)."""

    weapons: list[Strict]


@dataclass(frozen=True)
class RequestBodies:
    """The pydantic classes of the contract-shaped request bodies, and how to resolve them."""

    contract: GenerationContract
    templates: WeaponTemplates
    image: type[Strict]
    weapon: type[Strict]
    image_job: type[ImageJobBody]
    weapon_job: type[WeaponJobBody]

    @classmethod
    def build(
        cls,
        contract: GenerationContract,
        templates: WeaponTemplates,
        max_job_items: int,
        callbacks: CallbackRules | None,
    ) -> RequestBodies:
        """Every body for this contract; job bodies hold 1..max_job_items images."""
        job_base = job_options(callbacks)
        if templates.default_style and contract.style(templates.default_style) is None:
            log.warning(
                "the weapon templates' default style is not served (%s): weapons have none",
                contract.style_problem(templates.default_style),
            )
        validators = {"known_style": _known_style(contract)}
        image = create_model(
            "ImageRequest",
            __base__=ImageOptions,
            __validators__=validators,
            **_words(contract),
            **_options(contract),
        )
        weapon = create_model(
            "WeaponRequest",
            __base__=ImageOptions,
            __validators__=validators,
            **templates.fields_schema(),
            **_options(contract, templates.default_style),
        )
        image_job = create_model(
            "ImageJobRequest",
            __base__=(ImageJobBody, job_base),
            images=(
                list[image],
                Field(min_length=1, max_length=max_job_items, description="one image each"),
            ),
        )
        weapon_job = create_model(
            "WeaponJobRequest",
            __base__=(WeaponJobBody, job_base),
            weapons=(
                list[weapon],
                Field(min_length=1, max_length=max_job_items, description="one weapon each"),
            ),
        )
        return cls(
            contract,
            templates,
            image,
            weapon,
            cast(type[ImageJobBody], image_job),
            cast(type[WeaponJobBody], weapon_job),
        )

    def image_spec(self, body: Strict) -> ImageSpec:
        """The resolved image of an ImageRequest body (or a job's entry)."""
        return ImageSpec(
            **body.model_dump(include={"prompt", "negative_prompt"}), **self._options(body)
        )

    def _options(self, body: Strict) -> dict[str, Any]:
        """A body's options with the contract's defaults: an init_image's strength, a
        style's weight, and the content version of the style it names."""
        options = body.model_dump(include=set(OPTIONS))
        for option, needed in NEEDS.items():
            if options[needed] is None:
                options[option] = None
        if options["init_image"] is not None and options["strength"] is None:
            options["strength"] = self.contract.default_strength
        style = self.contract.style(options["style"]) if options["style"] else None
        if style is not None:
            if options["style_weight"] is None:
                options["style_weight"] = self.contract.default_style_weight
            options["style_version"] = style.version
        return options

    def parse(self, name: str, data: Any) -> Any:
        """`data` validated as the body class `name` (e.g. "ImageRequest"); a 422 if not.

        Errors carry FastAPI's shape (`loc` starting with "body"), so they leave the gateway
        as every other validation error does.
        """
        try:
            return self.classes[name].model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            ) from exc

    @property
    def classes(self) -> dict[str, type[Strict]]:
        """The body classes by their OpenAPI schema name."""
        return {
            cls.__name__: cls for cls in (self.image, self.weapon, self.image_job, self.weapon_job)
        }

    def image_job_specs(self, body: ImageJobBody) -> list[ImageSpec]:
        """The resolved images of an image job, in order."""
        return [self.image_spec(image) for image in body.images]

    def weapon_job_specs(self, body: WeaponJobBody) -> list[ImageSpec]:
        """The resolved images of a weapon job, in order."""
        return [self.weapon_spec(weapon) for weapon in body.weapons]

    def weapon_spec(self, body: Strict) -> ImageSpec:
        """The resolved image of a WeaponRequest body: the templates write the words."""
        prompt, negative = self.templates.render(body)
        return ImageSpec(prompt=prompt, negative_prompt=negative, **self._options(body))


class CurrentBodies:
    """The bodies of the contract in force, built again when the contract changes."""

    def __init__(
        self,
        contract: ContractBook,
        templates: WeaponTemplates,
        max_job_items: int,
        callbacks: CallbackRules | None,
    ) -> None:
        self.contract, self.templates, self.max_job_items = contract, templates, max_job_items
        self.callbacks = callbacks
        self._built: RequestBodies | None = None

    def get(self) -> RequestBodies:
        """The bodies of the current contract (UnknownContract if none was seen)."""
        contract = self.contract.current
        if self._built is None or self._built.contract.fingerprint != contract.fingerprint:
            self._built = RequestBodies.build(
                contract, self.templates, self.max_job_items, self.callbacks
            )
        return self._built


CONTRACT_BODY = "x-contract-body"  # operation marker: its body is this contract-shaped class
UPLOADS = "x-contract-uploads"  # operation marker: the body may come as multipart with an image


def contract_body(name: str, *, uploads: bool = False) -> dict[str, Any]:
    """`openapi_extra` of a route whose body is the contract-shaped class `name`; with
    `uploads`, also as multipart: the body as the part `request`, an input image as `image`."""
    return {CONTRACT_BODY: name, UPLOADS: uploads}


def multipart(body: dict[str, Any]) -> dict[str, Any]:
    """The multipart/form-data content of an operation whose JSON body is `body`: the body
    as the JSON part `request` (without init_image: the part `image` is the input image)."""
    return {
        "schema": {
            "type": "object",
            "required": ["request", "image"],
            "additionalProperties": False,
            "properties": {
                "request": body,
                "image": {"type": "string", "format": "binary", "description": "PNG, JPEG, WebP"},
            },
        },
        "encoding": {"request": {"contentType": "application/json"}},
    }


def document(openapi: dict[str, Any], bodies: RequestBodies | None) -> None:
    """Give the marked operations of an OpenAPI document their contract-shaped bodies.

    With no contract known yet, a marked operation documents a plain JSON object.
    """
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            name = operation.pop(CONTRACT_BODY, None)
            uploads = operation.pop(UPLOADS, False)
            if name is None:
                continue
            schema: dict[str, Any] = {"type": "object"}
            if bodies is not None:
                schema = {"$ref": f"#/components/schemas/{name}"}
                found = bodies.classes[name].model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
                schemas.update(found.pop("$defs", {}))
                schemas[name] = found
            content = {"application/json": {"schema": schema}}
            if uploads:
                content["multipart/form-data"] = multipart(schema)
            operation["requestBody"] = {"required": True, "content": content}

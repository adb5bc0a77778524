"""The content policy at the edge: what a request asks to draw, checked in its key's mode.

strict refuses text the policy blocks (422, a problem type of its own naming the category,
never the text), review lets it through with the categories in the result, off does not
check. Keys in strict and review mode also get the policy's negative prompt. Every refusal
leaves one audit log line: key id, route, category and a hash of the text, never the text.
"""

from __future__ import annotations

from pydantic import BaseModel

from gateway import metrics
from gateway.content_policy import audit_refusal
from gateway.keys import ApiKey
from gateway.problems import policy_problem
from gateway.schemas import ImageSpec
from gateway.services import Services

# The fields players type what they want into. Not the negative prompt: it names what an
# image should not have ("nudity" there asks for less of it), and the policy adds its own.
FREE_TEXT = ("prompt", "text")


def free_text(item: BaseModel) -> list[str]:
    """What a player typed in one image or weapon of a request body."""
    return [v for name in FREE_TEXT if isinstance(v := getattr(item, name, None), str) and v]


def screen(svc: Services, key: ApiKey, route: str, items: list[BaseModel]) -> list[list[str]]:
    """The policy's categories each item's text falls in, under the key's mode: 422 in
    strict mode if any item's does (audited), the categories to flag in review mode, none
    when the key's mode is off."""
    if key.content_policy == "off":
        return [[] for _ in items]
    policy = svc.policy.current()
    found = [policy.violations(free_text(item)) for item in items]
    outcome = "refused" if key.content_policy == "strict" else "flagged"
    for categories in found:
        for category in categories or ["none"]:
            metrics.CONTENT_POLICY.labels(category, outcome if categories else "allowed").inc()
    refused = [(i, c) for i, categories in enumerate(found) for c in categories]
    if refused and key.content_policy == "strict":
        texts = [t for item in items for t in free_text(item)]
        categories = sorted({c for _, c in refused})
        for category in categories:
            audit_refusal(key.id, route, category, texts)
        raise policy_problem(categories, f" (item {refused[0][0]})" if len(items) > 1 else "")
    return found


def covered(svc: Services, key: ApiKey, spec: ImageSpec) -> ImageSpec:
    """The image with the policy's negative prompt added (keys in strict or review mode)."""
    if key.content_policy == "off":
        return spec
    negative = svc.policy.current().with_negative(spec.negative_prompt)
    return spec.model_copy(update={"negative_prompt": negative})


def strict(key: ApiKey) -> bool:
    """Whether the key is refused what the policy blocks (its flagged images included)."""
    return key.content_policy == "strict"

"""The offline dependency audit of `make lint` (.ci/audit_dependencies.py) finds what it
should: a version inside an advisory's range matches, the fixed version does not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("audit", ROOT / ".ci" / "audit_dependencies.py")
assert spec is not None and spec.loader is not None
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


def test_an_affected_version_matches_and_a_fixed_one_does_not() -> None:
    snapshot = json.loads((ROOT / ".ci" / "advisories.json").read_text())
    ranged = [a for a in snapshot["advisories"] if any(f for _, f in a["ranges"])]
    assert len(ranged) > 20  # the snapshot holds real advisories for installed packages
    for advisory in ranged[:20]:
        introduced, fixed = next((i, f) for i, f in advisory["ranges"] if f)
        assert not audit.affected(advisory, fixed), advisory["id"]
        if introduced not in (None, "0") and introduced != fixed:
            assert audit.affected(advisory, introduced), advisory["id"]


def test_the_installed_set_has_no_unaccepted_advisory() -> None:
    assert audit.check() == 0

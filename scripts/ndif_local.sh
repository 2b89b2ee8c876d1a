#!/usr/bin/env bash
# A real NDIF server on 127.0.0.1, CPU only, serving the embedded SmolLM2-135M checkpoint.
#
#   scripts/ndif_local.sh install   server packages into .venv (pinned: scripts/ndif/requirements.txt)
#   scripts/ndif_local.sh start     redis, S3 (moto), Ray head + controller, API; deploy; wait for a trace
#   scripts/ndif_local.sh stop      stop all of it, by pid file / process group (idempotent)
#   scripts/ndif_local.sh status    what runs, and what a client must use
#
# `start` ends by printing `export NDIF_HOST=http://127.0.0.1:PORT` and the model's path and key;
# the same lines are in .ndif/env (source it). Client side: scripts/ndif/ndif_client.py,
# scripts/ndif/smoke.py, scripts/ndif/NOTES.md. State (pid files, logs, checkpoint) is under .ndif/.
# Every port can be moved with an environment variable (defaults below). All servers run under
# `nice -n 19` (NDIF_LOCAL_NICE).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/.venv/bin"
NDIF_VERSION=0.1.2
STATE="${NDIF_LOCAL_DIR:-$ROOT/.ndif}"
RUN="$STATE/run"
LOGS="$STATE/logs"
CHECKPOINT="${NDIF_LOCAL_CHECKPOINT:-$STATE/smollm2-135m}"
BIND=127.0.0.1

API_PORT="${NDIF_LOCAL_API_PORT:-8011}"
REDIS_PORT="${NDIF_LOCAL_REDIS_PORT:-6390}"
S3_PORT="${NDIF_LOCAL_S3_PORT:-9010}"
RAY_PORT="${NDIF_LOCAL_RAY_PORT:-6395}"                  # GCS
RAY_CLIENT_PORT="${NDIF_LOCAL_RAY_CLIENT_PORT:-10011}"   # ray:// client server (ndif status)
RAY_DASHBOARD_PORT="${NDIF_LOCAL_RAY_DASHBOARD_PORT:-8275}"  # state API the controller reads
RAY_PORT_BASE="${NDIF_LOCAL_RAY_PORT_BASE:-20100}"       # +0..+5 Ray internals, +100..+199 workers
# A short, per-checkout Ray temp dir (Unix socket paths must stay < 108 characters). Its logs
# (session_latest/logs) stay after stop; start clears it.
RAY_TMP="${NDIF_LOCAL_RAY_TMP:-/tmp/ndif-ray-$(printf %s "$ROOT" | sha1sum | cut -c1-8)}"
# Model-memory budget the controller may place into ("GPU" memory it believes it has), bytes.
MODEL_BUDGET="${NDIF_LOCAL_MODEL_BUDGET_BYTES:-8000000000}"
# One deadline for the whole start. An idle 2-core machine starts in ~1.5 min; under `nice -n 19`
# next to jobs that keep both cores busy every Python process starts slowly, and a start has
# taken 29 min (see scripts/ndif/NOTES.md).
START_TIMEOUT="${NDIF_LOCAL_START_TIMEOUT:-3600}"
NICE="${NDIF_LOCAL_NICE:-19}"   # niceness of every server process (and the installs)
SERVICES=(redis s3 ray api)   # start order; stop runs it backwards

export NDIF_HOST="http://$BIND:$API_PORT"
log() { printf '[ndif_local] %s\n' "$*"; }
START_DEADLINE=$((SECONDS + START_TIMEOUT))
left() { local n=$((START_DEADLINE - SECONDS)); [ $n -gt 0 ] && echo $n || echo 1; }
die() { printf '[ndif_local] ERROR: %s\n' "$*" >&2; exit 1; }

# The environment every NDIF process reads (see scripts/ndif/NOTES.md for the list).
service_env() {
    export NDIF_REDIS_URL="redis://$BIND:$REDIS_PORT"
    export NDIF_OBJECT_STORE_URL="http://$BIND:$S3_PORT"
    export NDIF_OBJECT_STORE_PUBLIC_URL="http://$BIND:$S3_PORT"
    export NDIF_OBJECT_STORE_ACCESS_KEY="${NDIF_OBJECT_STORE_ACCESS_KEY:-ndiflocal}"
    export NDIF_OBJECT_STORE_SECRET_KEY="${NDIF_OBJECT_STORE_SECRET_KEY:-ndiflocal}"
    export NDIF_OBJECT_STORE_BUCKET="${NDIF_OBJECT_STORE_BUCKET:-ndif-results}"
    # The API's dispatcher and `ndif deploy` attach to the GCS directly, as Ray drivers (ndif's
    # Ray provider supports both). The stock ray:// client address goes through Ray's client-
    # server proxy, which forks a server per connection; here that sometimes never answered
    # ("Connecting to Ray" forever, or "Proxy failed to Connect to backend"). The client server
    # still runs on RAY_CLIENT_PORT for `ndif status` and other ray:// users.
    export NDIF_RAY_ADDRESS="$BIND:$RAY_PORT"
    export NDIF_API_URL="$NDIF_HOST"
    export NDIF_API_PORT="$API_PORT"
    export NDIF_HOME="$STATE"
    export NDIF_MODEL_IMPORT_PATH="ndif_cpu_actor.CPUModelActor"
    export NDIF_DEFAULT_DTYPE=float32
    export NDIF_LOKI_URL="" NDIF_INFLUX_URL="" NDIF_POSTGRES_URL=""
    export NDIF_ENVIRONMENT=local
    # The model actor's torch thread count: what a plain process here uses (Ray would give the
    # one-CPU actor a single thread, and results would differ from a local run by ~1e-5).
    if [ -z "${NDIF_CPU_THREADS:-}" ]; then
        NDIF_CPU_THREADS=$(env -u OMP_NUM_THREADS -u MKL_NUM_THREADS "$PY" -c \
            'import torch; print(torch.get_num_threads())')
    fi
    export NDIF_CPU_THREADS
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
    export RAY_USAGE_STATS_ENABLED=0 GRPC_ENABLE_FORK_SUPPORT=0
    # Ray on one machine: with this off Ray takes 127.0.0.1 as the node address and binds its
    # servers there; otherwise it swaps 127.0.0.1 for the host's routable address.
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # Slow starts under `nice` on a busy machine: give the dashboard and the node registration
    # (scripts/ndif/ray_head.py) the whole start timeout instead of 60 s and 30 s, and do not
    # prestart one Python worker per CPU at boot.
    export RAY_DASHBOARD_STARTUP_TIMEOUT_S="${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-$START_TIMEOUT}"
    export NDIF_LOCAL_RAY_NODE_WAIT_S="${NDIF_LOCAL_RAY_NODE_WAIT_S:-$START_TIMEOUT}"
    export RAY_enable_worker_prestart=0
    # Ray workers (controller, model actor) import the CPU actor from here.
    export PYTHONPATH="$ROOT/scripts/ndif${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$BIN:$PATH"
}

# -- install -------------------------------------------------------------------------------------

install_stamp() {
    echo "$ROOT/.venv/.ndif-installed-$(cat scripts/ndif/requirements.txt constraints.txt \
        <(echo "$NDIF_VERSION") | sha256sum | cut -c1-16)"
}

cmd_install() {
    if [ ! -x "$PY" ]; then
        log "no .venv: running scripts/setup.sh first"
        nice -n "$NICE" bash scripts/setup.sh
    fi
    if ! command -v redis-server >/dev/null; then
        log "installing redis-server (apt)"
        apt-get update -qq && nice -n "$NICE" apt-get install -y -qq redis-server >/dev/null
    fi
    local stamp
    stamp=$(install_stamp)
    if [ -f "$stamp" ]; then
        return 0
    fi
    log "installing the NDIF server packages into .venv (a few minutes)"
    nice -n "$NICE" "$PY" -m pip install --quiet -c constraints.txt -r scripts/ndif/requirements.txt
    # ndif declares Python >= 3.12; its code runs on 3.11. Its dependencies are in
    # requirements.txt, so install it alone (resolving everything with
    # --ignore-requires-python would pick sources that do not build on 3.11).
    nice -n "$NICE" "$PY" -m pip install --quiet --no-deps --ignore-requires-python \
        "ndif==$NDIF_VERSION"
    "$PY" -c "import ndif, ray, moto, nnsight; assert nnsight.__version__ == '0.8.1', nnsight.__version__" \
        || die "installed packages do not import"
    rm -f "$ROOT"/.venv/.ndif-installed-*
    touch "$stamp"
}

# -- process bookkeeping ------------------------------------------------------------------------

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
# alive PID: the process exists and is not a zombie (a killed child waiting to be reaped).
alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    case "$(ps -o stat= -p "$1" 2>/dev/null)" in Z*|"") return 1 ;; esac
}
service_alive() { alive "$(pid_of "$1")"; }
# group_alive PGID: a live (non-zombie) process is left in the process group.
group_alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found=1} END {exit !found}'; }

# spawn NAME CMD...: run CMD in its own session (pid == process group id) under nice -n $NICE,
# logging to $LOGS/NAME.log, and record its pid.
spawn() {
    local name=$1; shift
    setsid nice -n "$NICE" "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$RUN/$name.pid"
    sleep 0.5
    alive "$pid" || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited at once (log: $LOGS/$name.log)"; }
    log "$name started (pid $pid, log $LOGS/$name.log)"
}

# give_up WHAT LOG...: print the tails of the logs and fail.
give_up() {
    local what=$1 name; shift
    for name in "$@"; do echo "--- $LOGS/$name.log" >&2; tail -n 30 "$LOGS/$name.log" >&2; done
    die "$what"
}

# wait_tcp NAME PORT [LOGNAME]: until 127.0.0.1:PORT accepts a connection (or the start deadline).
wait_tcp() {
    local name=$1 port=$2 logname=${3:-$1}
    until (exec 3<>"/dev/tcp/$BIND/$port") 2>/dev/null; do
        service_alive "$logname" || give_up "$name died" "$logname"
        [ $SECONDS -lt $START_DEADLINE ] || give_up "$name: port $port not open (start timeout)" "$logname"
        sleep 0.5
    done
}

# stop_group NAME [GRACE_S]: SIGTERM the process group in NAME's pid file, then SIGKILL what is
# left after GRACE_S seconds (default 10).
stop_group() {
    local name=$1 pid
    pid=$(pid_of "$name")
    if alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 $((${2:-10} * 4))); do
            group_alive "$pid" || break
            sleep 0.25
        done
        local how="SIGTERM"
        if group_alive "$pid"; then
            kill -KILL -- "-$pid" 2>/dev/null || true
            how="SIGKILL after ${2:-10} s"
            sleep 0.5
        fi
        log "$name stopped (pid $pid, $how)"
    fi
    rm -f "$RUN/$name.pid"
}

# descendants PID: every process below PID (children, grandchildren, ...), by parent pid.
descendants() {
    local queue=("$1") pid child
    while [ ${#queue[@]} -gt 0 ]; do
        pid=${queue[0]}; queue=("${queue[@]:1}")
        for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
            echo "$child"; queue+=("$child")
        done
    done
}

# Ray processes of *this* cluster that name its temp dir (daemons started by `ray start`).
ray_pids() {
    local pid
    for pid in $(pgrep -f -- "$RAY_TMP" 2>/dev/null || true); do
        [ "$pid" != "$$" ] && echo "$pid"
    done
}

stop_ray() {
    # Ray workers (the controller and model actors among them) run in process groups of their
    # own, below the raylet: note them before the group goes, and stop them by pid.
    local workers="" left pid
    pid=$(pid_of ray)
    alive "$pid" && workers=$(descendants "$pid" | tr '\n' ' ')
    stop_group ray 40  # Ray drains for up to 30 s on SIGTERM
    left=""
    for pid in $workers; do alive "$pid" && left="$left $pid"; done
    if [ -n "${left// /}" ]; then
        log "ray: stopping leftover worker processes:$left"
        kill -TERM $left 2>/dev/null || true
        sleep 3
        for pid in $left; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    fi
    left=$(ray_pids | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
        log "ray: stopping leftover processes of this cluster: $left"
        kill -TERM $left 2>/dev/null || true
        sleep 2
        left=$(ray_pids | tr '\n' ' ')
        [ -z "${left// /}" ] || kill -KILL $left 2>/dev/null || true
    fi
    # `ray stop` as the last resort, only while processes of this cluster survive (it stops every
    # Ray cluster of this user on the machine).
    if [ -n "$(ray_pids)" ]; then
        log "ray: processes survive; running ray stop --force"
        "$BIN/ray" stop --force >>"$LOGS/ray.log" 2>&1 || true
    fi
}

# -- start ---------------------------------------------------------------------------------------

start_redis() {
    mkdir -p "$STATE/redis"
    spawn redis redis-server --bind "$BIND" --port "$REDIS_PORT" --protected-mode yes \
        --save "" --appendonly no --daemonize no --dir "$STATE/redis"
    wait_tcp redis "$REDIS_PORT"
}

start_s3() {
    spawn s3 "$BIN/moto_server" -H "$BIND" -p "$S3_PORT"
    wait_tcp s3 "$S3_PORT"
}

start_ray() {
    local resources
    resources=$(printf '{"head": 10, "cuda_memory_bytes": %s, "cpu_memory_bytes": %s}' \
        "$MODEL_BUDGET" "$(awk '/MemTotal/ {print $2 * 1024}' /proc/meminfo)")
    rm -rf "$RAY_TMP"
    # --block keeps `ray start` in the foreground as the group leader of Ray's daemons (the pid
    # file covers them; workers get groups of their own, and stop_ray finds them as its
    # descendants). --num-gpus=1: the controller only places models on nodes with a GPU
    # resource (the CPU actor never asks for one). scripts/ndif/ray_head.py is `ray start` with
    # longer startup waits and only the dashboard module NDIF uses (see its docstring).
    spawn ray "$PY" scripts/ndif/ray_head.py start --head --block --disable-usage-stats \
        --node-ip-address="$BIND" --port="$RAY_PORT" \
        --ray-client-server-port="$RAY_CLIENT_PORT" \
        --include-dashboard=true --dashboard-host="$BIND" --dashboard-port="$RAY_DASHBOARD_PORT" \
        --object-manager-port=$((RAY_PORT_BASE + 0)) --node-manager-port=$((RAY_PORT_BASE + 1)) \
        --dashboard-agent-listen-port=$((RAY_PORT_BASE + 2)) \
        --dashboard-agent-grpc-port=$((RAY_PORT_BASE + 3)) \
        --runtime-env-agent-port=$((RAY_PORT_BASE + 4)) \
        --metrics-export-port=$((RAY_PORT_BASE + 5)) \
        --min-worker-port=$((RAY_PORT_BASE + 100)) --max-worker-port=$((RAY_PORT_BASE + 199)) \
        --num-cpus="${NDIF_LOCAL_RAY_CPUS:-4}" --num-gpus=1 --resources="$resources" \
        --object-store-memory="${NDIF_LOCAL_RAY_OBJECT_STORE_BYTES:-500000000}" \
        --temp-dir="$RAY_TMP"
    wait_tcp "ray gcs" "$RAY_PORT" ray
    wait_tcp "ray client server" "$RAY_CLIENT_PORT" ray
    wait_tcp "ray dashboard" "$RAY_DASHBOARD_PORT" ray
    # `ray start` prints this once the node has registered (the dashboard agent may still be
    # starting; the controller launch below waits for what it needs).
    until grep -q "Ray runtime started" "$LOGS/ray.log"; do
        service_alive ray || give_up "ray died" ray
        [ $SECONDS -lt $START_DEADLINE ] || give_up "ray did not start (start timeout)" ray
        sleep 1
    done
    # The controller: a detached actor in the NDIF namespace; this launcher exits once it is
    # scheduled. Run from the stock module with the head's address.
    log "launching the NDIF controller"
    RAY_ADDRESS="$BIND:$RAY_PORT" timeout "$(left)" nice -n "$NICE" "$PY" -m \
        ndif.services.ray.deployments.controller.controller >>"$LOGS/controller.log" 2>&1 \
        || give_up "controller launch failed (or start timeout)" controller ray
}

start_api() {
    # The stock config binds 0.0.0.0; --bind on the command line wins over the config file.
    spawn api "$BIN/gunicorn" --config python:ndif.services.api.gunicorn_conf \
        --bind "$BIND:$API_PORT" --workers 1 ndif.services.api.app:app
    wait_tcp api "$API_PORT"
    until curl -fsS "$NDIF_HOST/ping" >/dev/null 2>&1; do
        service_alive api || give_up "api died" api
        [ $SECONDS -lt $START_DEADLINE ] || give_up "api /ping failed (start timeout)" api
        sleep 1
    done
}

deploy_model() {
    "$PY" scripts/ndif/ndif_client.py deploy-yaml "$CHECKPOINT" scripts/ndif/deploy.yaml.in \
        "$STATE/deploy.yaml" >/dev/null
    log "deploying $CHECKPOINT"
    until timeout "$(left)" nice -n "$NICE" "$BIN/ndif" deploy -f "$STATE/deploy.yaml" \
            --ray-address "$NDIF_RAY_ADDRESS" --redis-url "$NDIF_REDIS_URL" \
            >>"$LOGS/deploy.log" 2>&1; do
        # The controller may not be registered yet right after launch: retry.
        [ $SECONDS -lt $START_DEADLINE ] || give_up "deploy failed (start timeout)" deploy controller
        log "deploy not ready yet; retrying"
        sleep 3
    done
}

wait_for_trace() {
    local try_s
    until try_s=$(left); [ "$try_s" -gt 300 ] && try_s=300
            timeout "$try_s" "$PY" scripts/ndif/ndif_client.py ping "$CHECKPOINT" >>"$LOGS/ping.log" 2>&1; do
        [ $SECONDS -lt $START_DEADLINE ] || give_up "no remote trace succeeded (start timeout)" ping api deploy
        sleep 2
    done
}

write_env() {
    local key
    key=$("$PY" -c 'import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))["models"][0]["model_key"])' \
        "$STATE/deploy.yaml")
    {
        echo "export NDIF_HOST=$NDIF_HOST"
        echo "export NDIF_LOCAL_MODEL_PATH=$CHECKPOINT"
        echo "export NDIF_LOCAL_MODEL_KEY='$key'"
    } >"$STATE/env"
}

print_client_info() {
    cat "$STATE/env"
    log "client: CONFIG.API.HOST=\$NDIF_HOST (http, no SSL, no API key needed); build the model"
    log "        with scripts/ndif/ndif_client.py remote_model(\$NDIF_LOCAL_MODEL_PATH)"
}

cmd_start() {
    local started=$SECONDS
    cmd_install
    mkdir -p "$RUN" "$LOGS"
    local running=0 name
    for name in "${SERVICES[@]}"; do service_alive "$name" && running=$((running + 1)); done
    if [ $running -eq ${#SERVICES[@]} ] && [ -f "$STATE/env" ] \
            && timeout 120 "$PY" scripts/ndif/ndif_client.py ping "$CHECKPOINT" >>"$LOGS/ping.log" 2>&1; then
        log "already running"
        print_client_info
        return 0
    fi
    [ $running -eq 0 ] || { log "partly running: stopping first"; cmd_stop; mkdir -p "$RUN" "$LOGS"; }
    for name in redis s3 ray api controller deploy ping; do : >"$LOGS/$name.log"; done
    rm -f "$STATE/env"
    if [ ! -f "$CHECKPOINT/config.json" ] || [ ! -f "$CHECKPOINT/model.safetensors" ]; then
        log "writing the SmolLM2-135M checkpoint to $CHECKPOINT (once)"
        nice -n "$NICE" "$PY" scripts/ndif/ndif_client.py checkpoint "$CHECKPOINT"
    fi
    service_env
    # On any failure, stop what was started (logs stay in .ndif/logs);
    # NDIF_LOCAL_KEEP_ON_FAILURE=1 leaves it running for a look.
    START_OK=0
    trap 'if [ "$START_OK" != 1 ] && [ "${NDIF_LOCAL_KEEP_ON_FAILURE:-0}" != 1 ]; then
              log "start failed: stopping what was started"; cmd_stop; fi' EXIT
    start_redis
    start_s3
    start_ray
    start_api
    log "services up after $((SECONDS - started)) s"
    local t=$SECONDS
    deploy_model
    log "deployed after $((SECONDS - t)) s"
    t=$SECONDS
    wait_for_trace
    START_OK=1
    log "remote trace ok after $((SECONDS - t)) s; total start $((SECONDS - started)) s"
    write_env
    print_client_info
}

# -- stop / status --------------------------------------------------------------------------------

cmd_stop() {
    mkdir -p "$LOGS"
    local i name
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        name=${SERVICES[$i]}
        if [ "$name" = ray ]; then stop_ray; else stop_group "$name"; fi
    done
    rm -f "$STATE/env"
    log "stopped"
}

cmd_status() {
    local name pid rc=0
    for name in "${SERVICES[@]}"; do
        pid=$(pid_of "$name")
        if alive "$pid"; then
            printf '  %-6s running (pid %s, %s processes in its group)\n' "$name" "$pid" \
                "$(ps -eo pgid= | awk -v g="$pid" '$1 == g' | wc -l)"
        else
            printf '  %-6s stopped\n' "$name"; rc=1
        fi
    done
    printf '  ports: api %s, redis %s, s3 %s, ray gcs %s, ray client %s, ray dashboard %s (all %s)\n' \
        "$API_PORT" "$REDIS_PORT" "$S3_PORT" "$RAY_PORT" "$RAY_CLIENT_PORT" "$RAY_DASHBOARD_PORT" "$BIND"
    if curl -fsS "$NDIF_HOST/ping" >/dev/null 2>&1; then
        echo "  api /ping: ok"
    else
        echo "  api /ping: no answer"; rc=1
    fi
    [ -f "$STATE/env" ] && cat "$STATE/env"
    return $rc
}

case "${1:-}" in
    install) cmd_install; log "installed" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 install|start|stop|status|restart" >&2; exit 2 ;;
esac

# Shared by every slurm/*.sbatch script (sourced, not run): arguments check, environment, torchrun launch on one
# node or through `srun` on many (c10d rendezvous), and the stop -> checkpoint -> requeue -> resume cycle.
#
# An sbatch script sets TRAINER_HOME and optionally TRAINER_EXTRA_ARGS (arguments put before the user's) and
# TRAINER_JOB (its default job), sources this file, and calls `trainer_main single|multi "$@"`. Its usage text
# is its header comment. The job (the module `trainer.<job>`) is the first argument `--job NAME` if given, else
# TRAINER_JOB, else mlm. Everything below can be changed from the environment
# (`VAR=value sbatch ...`; the scripts rely on sbatch's default --export=ALL):
#
#   TRAINER_JOB             mlm (default), clm or classify: the job when the arguments do not start with --job
#   TRAINER_HOME            repository root: where slurm/ and ds_configs/ are (default: found from the script path)
#   TRAINER_VENV            Python environment to activate (default: $TRAINER_HOME/.venv; skipped if it does not
#                           exist, e.g. when the package is installed in the Python already on PATH)
#   TRAINER_PYTHON          Python interpreter (default: python3 from the activated environment)
#   TRAINER_DEVICE          gpu (default: NCCL, one process per GPU) or cpu (gloo, no GPU needed)
#   TRAINER_NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave the job on the node; 1 on cpu)
#   TRAINER_RDZV_PORT       multi-node rendezvous port (default: 15000 + job id % 10000)
#   TRAINER_STOP_TIMEOUT    seconds torchrun waits for its workers to checkpoint after a stop signal before it
#                           kills them (default 100; keep it below the lead time of sbatch --signal=B:USR2@120)
#   OMP_NUM_THREADS         default: the node's CPUs / processes per node
#   NCCL_*                  passed through unchanged; see slurm/README.md

TRAINER_JOBS=(mlm clm classify)  # the modules trainer.<job> that train through the engine
TRAINER_REQUEUE_SIGNAL=USR2   # what `#SBATCH --signal=B:USR2@120` sends to this batch shell
# torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers unless told otherwise; USR2 is added so
# that the stop reaches the workers through torchrun (and through srun, which would turn a SIGTERM into SIGKILL).
TRAINER_TORCHRUN_SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2

trainer_log() { echo "[slurm/$(basename "${TRAINER_SCRIPT:-sbatch}") $(date '+%F %T')] $*" >&2; }

# The sbatch script's header comment, the lines between `#!` and the first `#SBATCH`.
TRAINER_USAGE=$(sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//p;}' "$0")

trainer_die_with_usage() {
    echo "error: $1" >&2
    echo "$TRAINER_USAGE" >&2
    exit 2
}

# ------------------------------------------------------------------------------------------ arguments
# TRAINER_MODULE for a job name (`clm` or `trainer.clm`); an unknown name is refused before anything starts.
trainer_select_job() {
    local job=${1#trainer.}
    [[ " ${TRAINER_JOBS[*]} " == *" $job "* ]] ||
        trainer_die_with_usage "unknown job '$1': choose one of ${TRAINER_JOBS[*]} (--job NAME or TRAINER_JOB=NAME)"
    TRAINER_MODULE=trainer.$job
}

# The value of `--flag X` or `--flag=X` in the remaining arguments; empty if absent.
trainer_arg_value() {
    local flag=$1
    shift
    while (($#)); do
        case $1 in
            "$flag") echo "${2:-}"; return ;;
            "$flag"=*) echo "${1#*=}"; return ;;
        esac
        shift
    done
}

# A job's only argument may be a .yaml/.json config file (the modules accept that); read a key out of it.
trainer_config_value() {
    "$TRAINER_PYTHON" -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get(sys.argv[2]) or "")' \
        "$1" "$2"
}

trainer_is_config_file() { (($# == 1)) && [[ $1 =~ \.(ya?ml|json)$ ]]; }

# Refuse to start (exit 2 with the usage) without an output directory and training data: the output directory is
# what makes a requeued job resume, and a multi-node job should not find out about a typo after queueing for hours.
trainer_check_arguments() {
    (($#)) || trainer_die_with_usage "no arguments given"
    case $1 in -h | --help) echo "$TRAINER_USAGE"; exit 0 ;; esac
    if trainer_is_config_file "$@"; then
        [[ -r $1 ]] || trainer_die_with_usage "config file $1 is not readable"
        TRAINER_OUTPUT_DIR=$(trainer_config_value "$1" output_dir)
        [[ -n $(trainer_config_value "$1" train_file)$(trainer_config_value "$1" dataset_name) ]] ||
            trainer_die_with_usage "$1 sets neither train_file nor dataset_name"
    else
        TRAINER_OUTPUT_DIR=$(trainer_arg_value --output_dir "$@")
        [[ -n $(trainer_arg_value --train_file "$@")$(trainer_arg_value --dataset_name "$@") ]] ||
            trainer_die_with_usage "give the training data: --train_file PATH or --dataset_name NAME"
    fi
    [[ -n $TRAINER_OUTPUT_DIR ]] || trainer_die_with_usage "give --output_dir (a requeued job resumes from it)"
}

# ------------------------------------------------------------------------------------------ environment
trainer_activate_python() {
    local venv=${TRAINER_VENV:-$TRAINER_HOME/.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    elif [[ -n ${TRAINER_VENV:-} ]]; then
        trainer_die_with_usage "TRAINER_VENV=$TRAINER_VENV has no bin/activate"
    fi
    TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
}

# The names inside the output directory (checkpoint-<step>/, checkpoint_complete, all_results.json, ...) from the
# package itself, trainer/layout.py, as TRAINER_LAYOUT_<NAME> variables; with the Python that runs the job.
trainer_load_layout() {
    local assignments
    assignments=$("$TRAINER_PYTHON" -m trainer.layout) ||
        trainer_die_with_usage "$TRAINER_PYTHON cannot run trainer.layout: install the package or set TRAINER_VENV"
    eval "$assignments"
}

trainer_processes_per_node() {
    if [[ -n ${TRAINER_NPROC_PER_NODE:-} ]]; then
        echo "$TRAINER_NPROC_PER_NODE"
    elif [[ $TRAINER_DEVICE == cpu ]]; then
        echo 1
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then  # set by --gpus-per-node / --gres=gpu:N
        echo "$SLURM_GPUS_ON_NODE"
    else
        trainer_die_with_usage "no GPUs allocated: submit with --gpus-per-node=N (or set TRAINER_NPROC_PER_NODE, or TRAINER_DEVICE=cpu)"
    fi
}

trainer_setup_environment() {
    TRAINER_DEVICE=${TRAINER_DEVICE:-gpu}
    [[ $TRAINER_DEVICE == gpu || $TRAINER_DEVICE == cpu ]] ||
        trainer_die_with_usage "TRAINER_DEVICE must be gpu or cpu, got '$TRAINER_DEVICE'"
    TRAINER_NPROC=$(trainer_processes_per_node) || exit 2
    [[ $TRAINER_NPROC =~ ^[1-9][0-9]*$ ]] || trainer_die_with_usage "bad processes per node: '$TRAINER_NPROC'"
    if [[ $TRAINER_DEVICE == cpu ]]; then
        export CUDA_VISIBLE_DEVICES=""  # no GPU visible: accelerate runs on the CPU and torch.distributed on gloo
    fi
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    # Several processes each spawning one OpenMP thread per core oversubscribe the node many times over.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / TRAINER_NPROC > 0 ? cpus / TRAINER_NPROC : 1))}
    export PYTHONFAULTHANDLER=1  # a hung or crashed rank prints every thread's Python stack into the job log
    export PYTHONUNBUFFERED=1    # log lines reach %x-%j.out when they happen, not when a buffer fills
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TRAINER_STOP_TIMEOUT:-100}
}

# ------------------------------------------------------------------------------------------ launch
# torchrun's options for this job. single: one node, torchrun picks a free local port (two jobs sharing a node
# cannot collide). multi: c10d rendezvous hosted by the first node of the allocation, on a port derived from the
# job id; every node's torchrun gets the same options, so they are computed once, here in the batch shell.
trainer_torchrun_options() {
    local mode=$1
    TRAINER_TORCHRUN=(--nproc_per_node="$TRAINER_NPROC" --signals-to-handle="$TRAINER_TORCHRUN_SIGNALS")
    if [[ $mode == single ]]; then
        TRAINER_TORCHRUN+=(--standalone --nnodes=1)
        return
    fi
    local head=${TRAINER_RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    local port=${TRAINER_RDZV_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
    TRAINER_TORCHRUN+=(--nnodes="${SLURM_JOB_NUM_NODES:-1}" --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID"
                       --rdzv_endpoint="$head:$port")
}

# On a requeued run, resume explicitly: --overwrite_output_dir on the command line would otherwise start afresh.
trainer_resume_options() {
    TRAINER_RESUME=()
    if ((${SLURM_RESTART_COUNT:-0} > 0)) && ! trainer_is_config_file "$@" &&
        compgen -G "$TRAINER_OUTPUT_DIR/$TRAINER_LAYOUT_PREFIX*/$TRAINER_LAYOUT_COMPLETE_MARKER" >/dev/null; then
        TRAINER_RESUME=(--resume_from_checkpoint latest)
    fi
}

# A config file must be the module's only argument: then the script adds nothing (put deepspeed etc. in the file).
trainer_launch_command() {
    local mode=$1
    shift
    if trainer_is_config_file "$@"; then
        TRAINER_EXTRA_ARGS=()
    fi
    local torchrun=("$TRAINER_PYTHON" -m torch.distributed.run "${TRAINER_TORCHRUN[@]}" -m "$TRAINER_MODULE")
    if [[ $mode == single ]]; then
        TRAINER_COMMAND=("${torchrun[@]}" "${TRAINER_EXTRA_ARGS[@]}" "$@" "${TRAINER_RESUME[@]}")
    else
        # One task per node, each with all the node's CPUs (srun does not inherit --cpus-per-task since 22.05).
        TRAINER_COMMAND=(srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1
                         --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${torchrun[@]}" "${TRAINER_EXTRA_ARGS[@]}" "$@" "${TRAINER_RESUME[@]}")
    fi
}

# ------------------------------------------------------------------------------------------ stop and requeue
# Slurm sends USR2 to this shell (only) ahead of the time limit, or a user does (scancel --signal=USR2 --batch).
# Pass it on to torchrun (single) or srun (multi: srun forwards it to the torchrun of every node); torchrun
# forwards it to its workers, which checkpoint at the next optimizer step on every rank and exit. Then requeue.
trainer_on_requeue_signal() {
    trap '' "$TRAINER_REQUEUE_SIGNAL"
    TRAINER_STOP_REASON=requeue
    trainer_log "SIG$TRAINER_REQUEUE_SIGNAL: asking the training processes to checkpoint and stop, then requeueing"
    kill "-$TRAINER_REQUEUE_SIGNAL" "$TRAINER_LAUNCHER_PID" 2>/dev/null
}

# scancel, the time limit or a pre-emption signal the whole job with SIGTERM: stop the same way, without
# requeueing (on pre-emption with PreemptMode=REQUEUE Slurm requeues the job itself).
trainer_on_terminate() {
    trap '' TERM "$TRAINER_REQUEUE_SIGNAL"
    TRAINER_STOP_REASON=${TRAINER_STOP_REASON:-terminate}
    trainer_log "SIGTERM: asking the training processes to checkpoint and stop"
    kill "-$TRAINER_REQUEUE_SIGNAL" "$TRAINER_LAUNCHER_PID" 2>/dev/null
}

# Run the launcher in the background so that bash can run the traps while it waits (bash runs a trap only between
# commands), and return its exit status.
trainer_run_launcher() {
    trap trainer_on_requeue_signal "$TRAINER_REQUEUE_SIGNAL"
    trap trainer_on_terminate TERM
    "${TRAINER_COMMAND[@]}" &
    TRAINER_LAUNCHER_PID=$!
    while wait "$TRAINER_LAUNCHER_PID"; [[ -e /proc/$TRAINER_LAUNCHER_PID ]]; do
        :  # the wait was cut short by a trapped signal; the launcher is still saving: keep waiting
    done
    wait "$TRAINER_LAUNCHER_PID"  # bash keeps the exit status of a finished background job
}

# Training finished in this run when it wrote the final results (the workers exit 0 both after finishing and after
# a stop, and torchrun exits non-zero after forwarding any signal, so neither exit code tells which happened).
trainer_finished_in_this_run() {
    local results=$TRAINER_OUTPUT_DIR/$TRAINER_LAYOUT_RESULTS_FILE
    [[ -f $results && $(stat -c %Y "$results") -ge $TRAINER_RUN_START ]]
}

trainer_requeue_if_stopped() {
    local status=$1
    if [[ ${TRAINER_STOP_REASON:-} != requeue ]]; then
        exit "$status"
    fi
    if trainer_finished_in_this_run; then
        trainer_log "training had already finished; not requeueing"
        exit 0
    fi
    trainer_log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))); it resumes from the newest checkpoint in $TRAINER_OUTPUT_DIR"
    trap - TERM  # scontrol requeue ends this shell with SIGTERM
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# ------------------------------------------------------------------------------------------ main
trainer_main() {
    TRAINER_EXTRA_ARGS=("${TRAINER_EXTRA_ARGS[@]}")  # an empty array unless the sbatch script set one
    local mode=$1 job=${TRAINER_JOB:-mlm}
    shift
    case ${1:-} in
        --job) (($# >= 2)) || trainer_die_with_usage "--job needs a name: one of ${TRAINER_JOBS[*]}"
               job=$2
               shift 2 ;;
        --job=*) job=${1#--job=}
                 shift ;;
    esac
    trainer_select_job "$job"
    trainer_activate_python
    trainer_check_arguments "$@"
    trainer_setup_environment
    trainer_load_layout
    trainer_torchrun_options "$mode"
    trainer_resume_options "$@"
    trainer_launch_command "$mode" "$@"
    TRAINER_RUN_START=$(date +%s)
    trainer_log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:$(printf " %q" "${TRAINER_COMMAND[@]}")"
    trainer_run_launcher
    trainer_requeue_if_stopped $?
}

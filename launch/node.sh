#!/usr/bin/env bash
# Start this node's share of a multi-node run, for clusters without ssh between nodes (SLURM, Kubernetes, any
# scheduler that starts one process per node). Run it on every node, with the same arguments:
#
#   NODE_RANK=0 NNODES=2 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash launch/node.sh --config CONFIG.yaml ...
#   NODE_RANK=1 NNODES=2 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash launch/node.sh --config CONFIG.yaml ...
#
# Environment:
#   NODE_RANK      this node's index, 0 .. NNODES-1 (required)
#   NNODES         number of nodes (required)
#   MASTER_ADDR    address of node 0, reachable from every node (required when NNODES > 1; 127.0.0.1 otherwise)
#   MASTER_PORT    a free TCP port on node 0, the same on every node (default 29500)
#   GPUS_PER_NODE  ranks on each node (default: the number of GPUs nvidia-smi lists here)
#   HOSTFILE       optional DeepSpeed hostfile ("host slots=N" lines, node 0 first) for nodes with different slot
#                  counts; without it, one with NNODES lines of GPUS_PER_NODE slots is written to a temporary file.
#                  With --no_ssh the host names are only labels: nothing connects to them.
#
# Arguments are launch/train.py's. They are used as given, in the current directory (relative paths in them mean
# what they mean here); the script finds launch/train.py from its own location. One is node.sh's own:
#   --max-restarts N  after a crash, start the training again, up to N times (default LORAPLUS_MAX_RESTARTS, else
#                     0): it resumes from the newest complete checkpoint. Run every node with the same N: a crash
#                     anywhere ends every node's ranks (LORAPLUS_PEER_TIMEOUT, see pipeline/distributed/watchdog.py), so each
#                     node restarts once per crash, and restart K meets at MASTER_PORT + K (a fresh rendezvous: the
#                     old one may still be up while the last ranks end). Not restarted: a finished run (0), bad
#                     input (2), a stop by a signal (128 + N); at the cap one line says so (the crash's status). Under
#                     SLURM, slurm.sbatch requeues the job instead (fresh nodes) and runs node.sh without it.
#
# What it runs:
#   deepspeed --no_ssh --node_rank K --num_nodes N --master_addr A --master_port P --hostfile H --num_gpus G \
#       launch/train.py ARGS...
# The global rank of local rank L is K * GPUS_PER_NODE + L; rank 0 (on node 0) writes metrics.jsonl and seals the
# checkpoints, and output_dir must be on a filesystem every node shares.
#
# Exit status: 0 done, 2 bad input, 143 stopped by SIGTERM after a checkpoint (130 SIGINT); anything else a crash
# (75: this node's ranks ended because a rank elsewhere died; 247: a rank was SIGKILLed, as by the OOM killer).
#
# Signals: SIGTERM or SIGINT to this script is passed to the whole DeepSpeed process tree (the `deepspeed` runner
# does not forward signals to its ranks when it runs one node), every rank finishes its step and saves a
# checkpoint, and the script returns only once every process it started has exited, with status 128 + signal
# (143 for SIGTERM). A batch system that ends a step when its main process exits (SLURM kills what is left)
# therefore never cuts a checkpoint short. Other exits are the launcher's status: 0 done, 2 bad input, 143 a rank
# stopped by SIGTERM, anything else a failure. Bad environment here: one "node.sh: error:" line, exit 2.

set -u

die() {
    echo "node.sh: error: $*" >&2
    exit 2
}

in_range() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= $2 && 10#$1 <= $3)); } # VALUE MIN MAX, a decimal integer

max_restarts=${LORAPLUS_MAX_RESTARTS:-0}
args=()
while (($#)); do
    case $1 in
    --max-restarts) (($# >= 2)) || die "--max-restarts needs a number (restarts after a crash, e.g. 3)"
        max_restarts=$2
        shift 2 ;;
    --max-restarts=*) max_restarts=${1#*=}
        shift ;;
    *) args+=("$1")
        shift ;;
    esac
done
in_range "$max_restarts" 0 1000 || die "--max-restarts (or LORAPLUS_MAX_RESTARTS) $max_restarts is not 0 .. 1000"
max_restarts=$((10#$max_restarts))

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P) || die "cannot resolve the script's directory"
train="$(dirname -- "$here")/launch/train.py"
[[ -f $train ]] || die "$train not found (node.sh must stay in the repository's launch/ directory)"

[[ -n ${NNODES:-} ]] || die "NNODES is not set (number of nodes taking part, e.g. NNODES=2)"
in_range "$NNODES" 1 100000 || die "NNODES=$NNODES is not a positive integer"
NNODES=$((10#$NNODES))
[[ -n ${NODE_RANK:-} ]] || die "NODE_RANK is not set (this node's index, 0 .. $((NNODES - 1)))"
in_range "$NODE_RANK" 0 100000 || die "NODE_RANK=$NODE_RANK is not an integer 0 .. $((NNODES - 1))"
NODE_RANK=$((10#$NODE_RANK))
((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK is out of range for NNODES=$NNODES (0 .. $((NNODES - 1)))"
if [[ -z ${MASTER_ADDR:-} ]]; then
    ((NNODES == 1)) || die "MASTER_ADDR is not set (address of node 0, reachable from every node)"
    MASTER_ADDR=127.0.0.1
fi
MASTER_PORT=${MASTER_PORT:-29500}
in_range "$MASTER_PORT" 1 65535 || die "MASTER_PORT=$MASTER_PORT is not a TCP port (1 .. 65535)"
MASTER_PORT=$((10#$MASTER_PORT))

if [[ -z ${GPUS_PER_NODE:-} && -z ${HOSTFILE:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ')
    fi
    [[ ${GPUS_PER_NODE:-0} != 0 ]] ||
        die "GPUS_PER_NODE is not set and nvidia-smi lists no GPU here; set GPUS_PER_NODE (ranks per node)"
fi
if [[ -n ${GPUS_PER_NODE:-} ]]; then
    in_range "$GPUS_PER_NODE" 1 1024 || die "GPUS_PER_NODE=$GPUS_PER_NODE is not a positive integer"
    GPUS_PER_NODE=$((10#$GPUS_PER_NODE))
fi
command -v deepspeed >/dev/null 2>&1 ||
    die "deepspeed is not on PATH (activate the environment the project is installed in)"

tmp_hostfile=
# shellcheck disable=SC2317,SC2329  # (trap handlers)
cleanup() { [[ -z $tmp_hostfile ]] || rm -f -- "$tmp_hostfile"; }
trap cleanup EXIT
if [[ -n ${HOSTFILE:-} ]]; then
    [[ -f $HOSTFILE && -r $HOSTFILE ]] || die "HOSTFILE=$HOSTFILE is not a readable file"
    hosts=$(grep -cE '^[[:space:]]*[^#[:space:]][^[:space:]]*[[:space:]]+slots=[0-9]+' "$HOSTFILE")
    ((hosts >= NNODES)) ||
        die "HOSTFILE=$HOSTFILE lists $hosts host(s) ('host slots=N' lines); NNODES=$NNODES needs $NNODES"
    hostfile=$HOSTFILE
else
    tmp_hostfile=$(mktemp "${TMPDIR:-/tmp}/loraplus-hostfile.XXXXXX") || die "cannot create a temporary hostfile"
    for ((i = 0; i < NNODES; i++)); do echo "node-$i slots=$GPUS_PER_NODE"; done >"$tmp_hostfile" ||
        die "cannot write the temporary hostfile $tmp_hostfile"
    hostfile=$tmp_hostfile
fi

echo "node.sh: node $NODE_RANK of $NNODES, ${GPUS_PER_NODE:-hostfile} rank(s) per node," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT" >&2

group_alive() { # any process of the group left that is not a zombie (the runner's children are orphans now)
    if command -v ps >/dev/null 2>&1; then
        ps -A -o pgid= -o stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
    else
        kill -0 -- "-$1" 2>/dev/null
    fi
}
wait_group_gone() { # GROUP SECONDS: wait for the group's last process, SIGKILL what is left after SECONDS
    local waited=0
    while group_alive "$1"; do
        if ((waited >= $2 * 10)); then
            echo "node.sh: processes left $2 s after $3; killing them" >&2
            kill -s KILL -- "-$1" 2>/dev/null || true
            return
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# The DeepSpeed tree runs in a process group of its own (job control on), so a signal can reach all of it.
stop_signal=
group=
# shellcheck disable=SC2317,SC2329
forward() {
    [[ -n $stop_signal ]] || stop_signal=$1
    [[ -z $group ]] || kill -s "$1" -- "-$group" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

restarts=0
while :; do
    port=$((MASTER_PORT + restarts))
    cmd=(deepspeed --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR"
        --master_port "$port" --hostfile "$hostfile")
    # A HOSTFILE's slot counts rule (--num_gpus would override every node's); else GPUS_PER_NODE is the count.
    [[ -n ${HOSTFILE:-} || -z ${GPUS_PER_NODE:-} ]] || cmd+=(--num_gpus "$GPUS_PER_NODE")
    cmd+=("$train" ${args[@]+"${args[@]}"})

    set -m
    "${cmd[@]}" &
    group=$!
    set +m
    [[ -z $stop_signal ]] || kill -s "$stop_signal" -- "-$group" 2>/dev/null || true # signalled while starting

    status=0
    while :; do
        wait "$group"
        status=$?
        kill -0 "$group" 2>/dev/null || break # else the wait was cut short by a trapped signal: wait on
    done

    if [[ -n $stop_signal ]]; then
        # The runner dies at once on a signal; the DeepSpeed launcher and the ranks finish the step and save (the
        # launcher SIGKILLs ranks that are not done 30 s after its signal). Wait for all of them, and make sure.
        wait_group_gone "$group" 120 "$stop_signal"
        exit $((128 + $(kill -l "$stop_signal")))
    fi
    case $status in
    0 | 2 | 130 | 143) exit "$status" ;; # done, bad input, stopped by a signal (after a checkpoint)
    esac
    wait_group_gone "$group" 60 "the crash" # a frozen rank outlives its launcher
    if ((restarts >= max_restarts)); then
        ((max_restarts == 0)) || echo "node.sh: error: node $NODE_RANK: the training failed again (exit status" \
            "$status); $restarts of $max_restarts restart(s) used (--max-restarts); not restarting; the ranks'" \
            "output is above, metrics in output_dir/metrics.jsonl" >&2
        exit "$status"
    fi
    restarts=$((restarts + 1))
    echo "node.sh: node $NODE_RANK: the training failed (exit status $status); restart $restarts of" \
        "$max_restarts, from the newest checkpoint, rendezvous $MASTER_ADDR:$((MASTER_PORT + restarts))" >&2
done

#!/usr/bin/env bash
# Trains one config on a Cloud TPU VM or pod slice, start to finish: creates the TPU VM, sets up
# every worker (clone, install), runs the same `scripts/train.py --distributed` command on every
# worker (jax.distributed finds the Cloud TPU workers by itself), copies the workdir back, and
# deletes the VM (also when a step fails; --keep leaves it running).
#
#   scripts/launch/tpu_vm.sh --repo https://github.com/OWNER/flax_mnist \
#     --workdir gs://BUCKET/runs/cnn --config configs/cnn.py --accelerator v4-32 \
#     -- --config.num_epochs=20
#
# The workdir is a gs:// path on more than one host (every worker saves checkpoints into the same
# directory); a local path works on a single-host slice (v4-8) and is fetched from worker 0.
# MNIST comes from TFDS on each worker (internet). Arguments after -- go to train.py.
# --dry_run (or DRY_RUN=1) prints the commands instead of running them.

set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: tpu_vm.sh --repo URL --workdir gs://BUCKET/PATH [--config configs/cnn.py] [--name flax-mnist]
                 [--zone us-central2-b] [--accelerator v4-8] [--version tpu-ubuntu2204-base]
                 [--project PROJECT] [--ref GIT_REF] [--results runs] [--keep] [--dry_run]
                 [-- train.py flags]
USAGE
  exit 2
}

NAME=flax-mnist
ZONE=us-central2-b
ACCELERATOR=v4-8
VERSION=tpu-ubuntu2204-base
PROJECT=""
REPO_URL=""
REF=""
CONFIG=configs/cnn.py
WORKDIR=""
RESULTS=runs
KEEP=0
TRAIN_ARGS=()
while (($#)); do
  case $1 in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator) ACCELERATOR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --repo) REPO_URL=$2; shift 2 ;;
    --ref) REF=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $REPO_URL && -n $WORKDIR ]] || { echo "error: --repo and --workdir are required" >&2; usage; }

# One argument quoted as Python's shlex.quote does.
quote() {
  local arg=$1
  if [[ -z $arg ]]; then
    printf "''"
  elif [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//\'/\'\"\'\"\'}"
  fi
}

# Arguments as one shell line.
join() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# Prints a command as one shell line, or runs it.
run() {
  if [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
    printf '%s\n' "$(join "$@")"
  else
    "$@"
  fi
}

LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

# What every worker runs, in its home directory. pip installs for the user (the image's Python);
# gcsfs lets etils.epath (and so the workdir) read and write gs:// paths.
CHECKOUT="git clone -q $(quote "$REPO_URL") flax_mnist"
[[ -n $REF ]] && CHECKOUT+=" && git -C flax_mnist checkout -q $(quote "$REF")"
SETUP="set -e; rm -rf flax_mnist; $CHECKOUT; cd flax_mnist; python3 -m pip install -q -U pip; "
SETUP+='python3 -m pip install -q -e ".[tpu]" gcsfs'
TRAIN_COMMAND=(python3 scripts/train.py --config "$CONFIG" --workdir "$WORKDIR" --distributed)
TRAIN="cd flax_mnist && $(join "${TRAIN_COMMAND[@]}" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})"

delete_vm() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
}

run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$VERSION"
if ((!KEEP)); then
  trap delete_vm EXIT
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$SETUP"
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$TRAIN"
run mkdir -p "$RESULTS"
if [[ $WORKDIR == gs://* ]]; then
  run gcloud storage cp --recursive "$WORKDIR" "$RESULTS"
else
  run gcloud compute tpus tpu-vm scp --recurse "$NAME:$WORKDIR" "$RESULTS" "${LOCATION[@]}" \
    --worker=0
fi

#!/usr/bin/env bash
# Cloud TPU VMs (v4, v5e, v5p slices, single- or multi-host): create one, install
# ddep on every worker, run an experiment on all workers at once, delete it.
#
#   launch/tpu.sh create --name=ddep-v4 --zone=us-central2-b --type=v4-32 [--spot]
#   launch/tpu.sh setup  --name=ddep-v4 --zone=us-central2-b
#   launch/tpu.sh run    --name=ddep-v4 --zone=us-central2-b \
#       --config=configs/pretrain_cityscapes.py:method=ddep \
#       --workdir=gs://BUCKET/ddep/pretrain/cityscapes/ddep_w1 \
#       --data_dir=gs://BUCKET/tensorflow_datasets [--background] [-- --config.seed=1]
#   launch/tpu.sh delete --name=ddep-v4 --zone=us-central2-b
#
# Every command takes --project=P (default: gcloud's) and --dry_run, which prints
# the commands instead of running them. --name/--zone default to $TPU_NAME/$TPU_ZONE.
# Workers keep the code in ~/ddep, its .venv and the encoders in ~/ddep/checkpoints.
# Multi-host slices need a workdir every worker sees (gs://...): orbax writes one
# checkpoint from all hosts. jax.distributed finds the other workers by itself
# (ddep/training/sharding.py). A run resumes from its workdir's last checkpoint, so after a
# preemption (--spot) re-create, set up and re-run the same command.
set -euo pipefail

# Keep equal to setup.py's pin: jax[tpu] adds libtpu to that same jax.
JAX_VERSION=0.10.2
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
# The ImageNet-21k encoders that ddep/config/recipes.py expects under checkpoints/.
ENCODER_URLS=(gs://vit_models/imagenet21k/R50+ViT-B_16.npz)
# Relative to the home directory, where every ssh command starts.
REMOTE_DIR=ddep

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "launch/tpu.sh: $*; see --help" >&2
  exit 2
}

# Prints its arguments as one line a shell reads back into the same words,
# single-quoting only the words that need it.
quote() {
  local word out=()
  for word in "$@"; do
    if [[ -z $word || $word =~ [^A-Za-z0-9_./:=@%+,-] ]]; then
      out+=("'${word//\'/\'\\\'\'}'")
    else
      out+=("$word")
    fi
  done
  echo "${out[*]}"
}

dry_run=0
do_cmd() {
  if ((dry_run)); then quote "$@"; else "$@"; fi
}

# The runtime image each TPU generation is documented to use with JAX.
default_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    *) die "unknown --type=$1; pass --version=RUNTIME" ;;
  esac
}

(($#)) || die 'missing command'
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
command=$1
shift
name=${TPU_NAME:-} zone=${TPU_ZONE:-} project='' type='' version='' spot=0
config='' workdir='' data_dir='' background=0 extra=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --spot) spot=1 ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --data_dir=*) data_dir=${1#*=} ;;
    --background) background=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n $name && -n $zone ]] || die "--name and --zone (or \$TPU_NAME, \$TPU_ZONE) are required"
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

case $command in
  create)
    [[ -n $type ]] || die 'create needs --type, e.g. v4-32, v5litepod-16, v5p-32'
    flags=(--accelerator-type="$type" --version="${version:-$(default_version "$type")}")
    ((spot)) && flags+=(--spot)
    do_cmd gcloud compute tpus tpu-vm create "$name" "${where[@]}" "${flags[@]}"
    ;;
  setup)
    # Ship the committed tree (never a local .venv or workdirs) to every worker.
    archive=${TMPDIR:-/tmp}/ddep-$name.tar.gz
    repo=$(cd "$(dirname "$0")/.." && pwd)
    do_cmd git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
    do_cmd gcloud compute tpus tpu-vm scp "$archive" "$name":ddep.tar.gz --worker=all "${where[@]}"
    # The TPU images ship Python 3.10; ddep needs 3.11.
    remote="set -e; sudo apt-get -qq update"
    remote+=" && sudo apt-get -qq install -y python3.11 python3.11-venv"
    remote+="; mkdir -p $REMOTE_DIR && tar -xzf ddep.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
    remote+="; python3.11 -m venv .venv && .venv/bin/pip install -q -U pip"
    remote+="; .venv/bin/pip install -q -e . $(quote "jax[tpu]==$JAX_VERSION") -f $LIBTPU_INDEX"
    remote+="; mkdir -p checkpoints && gcloud storage cp -n ${ENCODER_URLS[*]} checkpoints/"
    do_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote"
    ;;
  run)
    [[ -n $config && -n $workdir ]] || die 'run needs --config and --workdir'
    main=(.venv/bin/python -m ddep.main --config="$config" --workdir="$workdir")
    [[ -z $data_dir ]] || main+=(--config.data.data_dir="$data_dir")
    main+=("${extra[@]}")
    remote="cd $REMOTE_DIR && $(quote "${main[@]}")"
    if ((background)); then
      # Survives the ssh session; each worker logs to ddep/logs/<workdir's name>.log.
      log=logs/$(basename "$workdir").log
      remote="cd $REMOTE_DIR && mkdir -p logs"
      remote+=" && nohup setsid $(quote "${main[@]}") > $(quote "$log") 2>&1 < /dev/null &"
    fi
    do_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote"
    ;;
  delete)
    do_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    ;;
  *) die "unknown command: $command" ;;
esac

#!/usr/bin/env bash
# Runs one unif2ace_jax command on every worker of a Cloud TPU VM slice (same command, all hosts).
#
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [options] -- MODULE [FLAGS...]
#
#   bash launch/tpu_pod.sh --tpu=u2a-v5p-64 --zone=us-east5-a \
#       --repo=~/unif2ace_jax --data_dir=/mnt/shared/data --workdir=/mnt/shared/runs/1p8b \
#       --env=XLA_FLAGS=--xla_tpu_enable_async_collective_fusion=true \
#       -- unif2ace_jax.train --config=configs/unif2ace_1p8b.py \
#          --config.tokenizer_workdir=/mnt/shared/runs/magvit2
#
# Options:
#   --tpu=NAME        TPU VM name (required)          --zone=ZONE     its zone (required)
#   --project=ID      GCP project (default: gcloud's)  --worker=all    workers (default all)
#   --repo=DIR        checkout on the workers (default ~/unif2ace_jax)
#   --venv=DIR        venv on the workers, relative to --repo (default .venv)
#   --data_dir=PATH   passed as --config.data.data_dir=PATH
#   --workdir=PATH    passed as --workdir=PATH: a directory every worker sees (Filestore / gcsfuse
#                     mount); every host writes its checkpoint shards there through Orbax
#   --env=K=V         exported on every worker before the command (repeatable)
#   --setup           first `pip install -e '.[tpu]'` in the venv on every worker
#   --dry_run         print the gcloud command instead of running it
#
# Each worker runs `python -m MODULE FLAGS...`; `jax.distributed.initialize()` is called by the
# trainer itself (it sees the slice's TPU_WORKER_HOSTNAMES), each host reads its own 1/N of the
# data shards and feeds its local devices.
set -euo pipefail

tpu="" zone="" project="" worker="all" repo="~/unif2ace_jax" venv=".venv"
data_dir="" workdir="" setup=0 dry_run=0
envs=()
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --env=*) envs+=("${1#*=}") ;;
    --setup) setup=1 ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (put the command after --)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$tpu" ] || { echo "tpu_pod.sh: --tpu is required" >&2; exit 2; }
[ -n "$zone" ] || { echo "tpu_pod.sh: --zone is required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_pod.sh: no command after -- (e.g. -- unif2ace_jax.train ...)" >&2; exit 2; }

module="$1"; shift
args=("$@")
[ -n "$data_dir" ] && args+=("--config.data.data_dir=$data_dir")
[ -n "$workdir" ] && args+=("--workdir=$workdir")

remote="cd $repo && . $venv/bin/activate && export PYTHONUNBUFFERED=1"
for kv in "${envs[@]+"${envs[@]}"}"; do
  remote+=" && export $(printf '%q' "$kv")"
done
[ "$setup" = 1 ] && remote+=" && python -m pip install -q -e '.[tpu]'"
remote+=" && python -m $(printf '%q' "$module")"
for a in "${args[@]+"${args[@]}"}"; do
  remote+=" $(printf '%q' "$a")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker" "--command=$remote")
[ -n "$project" ] && cmd+=("--project=$project")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi

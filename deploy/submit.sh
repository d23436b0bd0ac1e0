#!/usr/bin/env bash
# Submit one salmap run to a standing Ray cluster with `ray job submit`.
#
# usage: deploy/submit.sh [options] RUN_ID CONFIG [key=value ...]
#   RUN_ID      the salmap run id (letters, digits, '_', '-', '.'). The Ray submission id is
#               salmap-RUN_ID, so Ray refuses a second submission of the same run.
#   CONFIG      a local job config file (uploaded with the job as its working_dir), or an
#               s3:// URL that salmap reads on the cluster.
#   key=value   OmegaConf overrides passed on to `salmap run`.
# options:
#   --address URL       Ray dashboard address, e.g. http://ray-head:8265
#                       (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)
#   --attempt N         N > 1 submits salmap-RUN_ID-attemptN: resumes a run whose earlier
#                       submission has ended (same run id, so salmap skips what is committed)
#   --runtime-env FILE  default: runtime_env.yaml next to this script
#   --no-wait           return once submitted instead of following the logs
# Token auth: export RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) when the cluster requires it.
# Exit status: that of `ray job submit` (0: the run succeeded; 1: it failed or was refused).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}
attempt=1
runtime_env="$here/runtime_env.yaml"
wait_flag=()

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address=${2:?--address needs a URL}; shift 2 ;;
    --attempt) attempt=${2:?--attempt needs a number}; shift 2 ;;
    --runtime-env) runtime_env=${2:?--runtime-env needs a file}; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
run_id=$1
config=$2
shift 2

[[ "$run_id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$ ]] \
  || die "run id '$run_id': use letters, digits, '_', '-', '.' (at most 128, no leading symbol)"
[[ "$attempt" =~ ^[1-9][0-9]*$ ]] || die "--attempt must be a positive integer, got '$attempt'"
[[ -n "$address" ]] || die "no Ray address: pass --address URL or export RAY_ADDRESS"
[[ -f "$runtime_env" ]] || die "runtime env file not found: $runtime_env"
for override in "$@"; do
  [[ "$override" == *=* ]] || die "override '$override' is not key=value"
done

submission_id="salmap-$run_id"
if [[ "$attempt" -gt 1 ]]; then
  submission_id+="-attempt$attempt"
fi

cmd=(ray job submit --address "$address" --submission-id "$submission_id"
  --runtime-env "$runtime_env"
  --metadata-json "{\"salmap_run_id\": \"$run_id\", \"salmap_attempt\": \"$attempt\"}")

if [[ "$config" == s3://* ]]; then
  entry_config=$config
elif [[ -f "$config" ]]; then
  # Upload the config alone: a fresh directory holding only job.yaml becomes the job's cwd.
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  cp "$config" "$stage/job.yaml"
  cmd+=(--working-dir "$stage")
  entry_config=job.yaml
else
  die "config '$config' is neither a local file nor an s3:// URL"
fi

cmd+=(${wait_flag[@]+"${wait_flag[@]}"} -- salmap run "$entry_config" "run.id=$run_id" "$@")

echo "submitting run $run_id as Ray job $submission_id to $address" >&2
status=0
"${cmd[@]}" || status=$?
if [[ $status -ne 0 ]]; then
  cat >&2 <<EOF
submit.sh: 'ray job submit' exited with $status.
  If Ray refused the submission id because it already exists, this run was submitted before:
    ray job status --address $address $submission_id
  To resume it after that job has ended, submit again with --attempt $((attempt + 1)).
EOF
fi
exit "$status"

#!/usr/bin/env bash
# GitLab Runner custom executor `run_exec`: called as `run.sh SCRIPT STAGE` for each stage
# (prepare_script, get_sources, ..., build_script (the job's `script`: step_script, which the
# runner still names build_script for run_exec), other step_* steps, after_script,
# archive_cache or archive_cache_on_failure, upload_artifacts_on_success or _on_failure,
# cleanup_file_variables), with the job's variables as CUSTOM_ENV_*; runs SCRIPT on this host. A
# failing script exits BUILD_FAILURE_EXIT_CODE (the job failed, not the runner).
#
# cleanup.sh is not told the job's result, so this records it in the volume's success marker: it
# is removed when one of the job's own steps (build_script, step_*) starts and set again when the
# step succeeds, so it stands only if the last step that ran finished well — a cancelled job (the
# runner kills this script in the middle of its step) leaves none. It is also removed when any
# stage fails, when a stage for a failed job runs (*_on_failure), and when after_script runs with
# a CI_JOB_STATUS other than success. after_script's own failure does not fail a GitLab job and
# does not remove the mark.
set -uo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
script=$1 stage=$2
marker="$JCFS_DIR/$JCFS_MARKER"
case "$stage" in
  build_script | step_* | *_on_failure) rm -f "$marker" ;;
  after_script) [ "${CUSTOM_ENV_CI_JOB_STATUS:-}" = success ] || rm -f "$marker" ;;
esac
JOBCACHEFS_DIR="$JCFS_DIR" bash "$script"
rc=$?
if [ "$rc" != 0 ]; then
  [ "$stage" = after_script ] || rm -f "$marker"
  exit "${BUILD_FAILURE_EXIT_CODE:-1}"
fi
case "$stage" in
  build_script | step_*) touch "$marker" ;;
esac

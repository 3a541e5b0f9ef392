#!/usr/bin/env bash
# GitLab Runner `post_build_script` (shell executor):
#   post_build_script = '/opt/jobcachefs/runners/gitlab/shell/post-build.sh'
# Runs right after the job's `script`, in the same errexit script, so only when every command of
# the script succeeded: reaching it is the job's success, and the volume is committed (into the
# cache or the job's scope, as pre-build.sh made it). A failed or cancelled job never gets here;
# its volume stays until the next job in this slot discards it (or `jobcachefs volume delete
# --discard`). after_script runs later and cannot change the outcome.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env ""
out=$(jcfs_finish "$JCFS_DIR" commit)
echo "jobcachefs: the job's script succeeded: $(printf '%s' "$out" | tr -s ' \n' ' ')" >&2

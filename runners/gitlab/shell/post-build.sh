#!/usr/bin/env bash
# GitLab Runner `post_build_script` (shell executor): runs in the job's shell right after the
# script, and only when the script succeeded (the runner stops at the script's first failing
# command), so reaching it is the job's success: the volume is committed (if its ref may write
# back). A failed job's volume is discarded by the next pre-build.sh in the same slot.
#   post_build_script = '/opt/jobcachefs/runners/gitlab/shell/post-build.sh'
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env ""
echo "jobcachefs: $(jcfs_finish "$JCFS_DIR" commit)" >&2

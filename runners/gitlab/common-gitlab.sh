# Shared by the GitLab recipes (sourced): the job's volume slot and cache from GitLab's
# predefined variables, given as $1 = the variables' prefix ("" in the job's shell, "CUSTOM_ENV_"
# in the custom executor's stages), and where it writes back (jcfs_gitlab_target in
# ../common.sh). The slot is per runner and concurrency slot (CI_RUNNER_ID, CI_CONCURRENT_ID):
# two jobs running at once on one runner never share it, and the next job in a slot finds, and
# discards, what a job whose end never ran left there.
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../common.sh"

jcfs_gitlab_env() {
  local p=$1 v
  v="${p}CI_RUNNER_ID"; local runner="${!v:-0}"
  v="${p}CI_CONCURRENT_ID"; local slot="${!v:-0}"
  v="${p}CI_PROJECT_PATH"; local project="${!v:-project}"
  JCFS_DIR="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/gitlab-$(jcfs_dns_label "$runner-$slot")"
  JCFS_CACHE="${JOBCACHEFS_CACHE:-$(jcfs_dns_label "$project")}"
  jcfs_gitlab_target "$p"
}

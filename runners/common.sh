# Shared by the runner recipes (sourced, not run). Two things live here, and only here for shell:
#  1. the MAPPING from what a CI system knows about a job (its ref, pull/merge request, whether
#     the ref is trusted) to where the job's volume writes back: the cache, or the job's own
#     scope of it (runners/github-action/src/mapping.js is the same mapping for JavaScript; both
#     are tested against one table, runners/mapping-cases.json);
#  2. how a job's volume is made and finished on a plain runner host.
#
# The mapping (docs/src/ci-systems.md):
#   - a pull/merge request writes into the scope "pr-<number>", whatever its branch;
#   - the default branch, and the refs the admin trusts, write into the cache;
#   - any other ref writes into its own scope: the ref's name made a DNS label (jcfs_dns_label);
#   - a failed or cancelled job commits nothing (each recipe's end hook decides; see there);
#   - a job whose end hook never ran is discarded by the next job in the same slot.
#
# Configured by environment variables, set where the runner's own environment is set (the GitHub
# runner's .env file, GitLab's config.toml `environment`):
#   JOBCACHEFS            the binary (default: jobcachefs on PATH)
#   JOBCACHEFS_ROOT       where job volumes are mounted (default /var/lib/jobcachefs-runners)
#   JOBCACHEFS_CACHE      cache name (default: the repository's path made a DNS label)
#   JOBCACHEFS_NAMESPACE  cache namespace (default: ci)
#   JOBCACHEFS_SIZE       volume size (default: the node config's)
#   JOBCACHEFS_WRITE_BACK auto (default: the mapping above) or false (every job only reads)
#   JOBCACHEFS_DEFAULT_BRANCH  the default branch (default: what the CI system says)
#   JOBCACHEFS_TRUSTED_REFS    more refs that write into the cache: shell patterns (* ? [...])
#                         matched against the branch or tag name, separated by spaces or commas
#                         (e.g. "release/* v[0-9]*")
#   JOBCACHEFS_TRUST_PROTECTED GitLab: protected refs write into the cache (default true)
#   JOBCACHEFS_SCOPE      write into this scope, whatever the ref (a DNS label)
#   JOBCACHEFS_STATE_DIR, JOBCACHEFS_CONFIG  passed on to jobcachefs (also through sudo)
# A runner that is not root reaches jobcachefs through `sudo -n` (docs: the sudoers line).

JCFS_MARKER=.jobcachefs-success

jcfs() {
  local sudo=() args=()
  [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  [ -n "${JOBCACHEFS_STATE_DIR:-}" ] && args+=(--state-dir "$JOBCACHEFS_STATE_DIR")
  [ -n "${JOBCACHEFS_CONFIG:-}" ] && args+=(--config "$JOBCACHEFS_CONFIG")
  "${sudo[@]}" "${JOBCACHEFS:-jobcachefs}" "${args[@]}" "$@"
}

# ---------------------------------------------------------------------------------------------
# The mapping (pure: no I/O but the environment it is given).

# A DNS-1123 label (what jobcachefs accepts as a cache or scope name) from any name: ASCII
# letters lower-cased, every other character outside [a-z0-9-] a '-', runs of '-' made one, '-'
# trimmed at both ends. Longer than 63: its first 54 characters, '-', and the first 8 hex digits
# of the SHA-256 of the original name (so two long names that share a prefix stay apart); empty:
# "ref-" and those 8 digits. "Feature/JIRA-12_x" -> "feature-jira-12-x".
jcfs_dns_label() {
  local name=$1 s h
  s=$(printf '%s' "$name" | LC_ALL=C tr 'A-Z' 'a-z' | LC_ALL=C tr -c 'a-z0-9-' '-' | LC_ALL=C tr -s '-')
  s=${s#-}
  s=${s%-}
  if [ -z "$s" ] || [ "${#s}" -gt 63 ]; then
    h=$(printf '%s' "$name" | sha256sum)
    h=${h:0:8}
    if [ -z "$s" ]; then s="ref-$h"; else s="${s:0:54}-$h"; fi
  fi
  printf '%s' "$s"
}

# Whether NAME matches one of PATTERNS (shell patterns separated by spaces or commas).
jcfs_ref_matches() {
  local name=$1 pat
  local -a pats
  # No pathname expansion of the patterns while splitting them.
  local IFS=$' \t\n,'
  set -f
  pats=($2)
  set +f
  for pat in "${pats[@]}"; do
    # shellcheck disable=SC2254 # the pattern is meant to match as a pattern
    case "$name" in $pat) return 0 ;; esac
  done
  return 1
}

# jcfs_decide REF PR TRUSTED: sets JCFS_SCOPE ("" means the cache itself) and JCFS_WRITE_BACK
# (true|false). REF: the branch or tag name; PR: the pull/merge request's number or ""; TRUSTED:
# true when the ref may write into the cache (the CI system's part decides: default branch,
# protected, the admin's patterns).
jcfs_decide() {
  local ref=$1 pr=$2 trusted=$3
  if [ -n "${JOBCACHEFS_SCOPE:-}" ]; then
    JCFS_SCOPE=$JOBCACHEFS_SCOPE
  elif [ -n "$pr" ]; then
    JCFS_SCOPE="pr-$pr"
  elif [ "$trusted" = true ]; then
    JCFS_SCOPE=
  else
    JCFS_SCOPE=$(jcfs_dns_label "$ref")
  fi
  case "${JOBCACHEFS_WRITE_BACK:-auto}" in
    false) JCFS_WRITE_BACK=false ;;
    *) JCFS_WRITE_BACK=true ;;
  esac
}

# A field of a JSON file (the GitHub event payload) by a jq path, with jq or python3, whichever
# the host has; empty when neither is there or the field is missing.
jcfs_json_field() {
  local file=$1 path=$2
  [ -r "$file" ] || return 0
  if command -v jq >/dev/null 2>&1; then
    jq -r "$path // empty" "$file" 2>/dev/null || true
  elif command -v python3 >/dev/null 2>&1; then
    python3 - "$file" "$path" <<'PY' 2>/dev/null || true
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].lstrip(".").split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)
PY
  fi
}

# GitHub Actions (job hooks): the mapping from the runner's documented variables
# (GITHUB_EVENT_NAME, GITHUB_REF, GITHUB_REF_NAME, GITHUB_HEAD_REF, GITHUB_EVENT_PATH).
# Pull requests never write into the cache: pull_request_target runs with GITHUB_REF set to the
# base branch, so the event's name decides, not the ref.
jcfs_github_target() {
  local event=${GITHUB_EVENT_NAME:-} ref=${GITHUB_REF:-} name pr="" default trusted=false
  case "$event" in
    pull_request*)
      case "$ref" in
        refs/pull/*/*) pr=${ref#refs/pull/}; pr=${pr%%/*} ;;
        *) pr=$(jcfs_json_field "${GITHUB_EVENT_PATH:-}" .pull_request.number) ;;
      esac
      case "$pr" in *[!0-9]*) pr= ;; esac
      name=${GITHUB_HEAD_REF:-${GITHUB_REF_NAME:-$ref}}
      ;;
    *)
      name=${GITHUB_REF_NAME:-}
      if [ -z "$name" ]; then name=${ref#refs/heads/}; name=${name#refs/tags/}; fi
      default=${JOBCACHEFS_DEFAULT_BRANCH:-$(jcfs_json_field "${GITHUB_EVENT_PATH:-}" .repository.default_branch)}
      if [ -n "$default" ] && [ "$ref" = "refs/heads/$default" ]; then
        trusted=true
      elif [ -n "${JOBCACHEFS_TRUSTED_REFS:-}" ] && jcfs_ref_matches "$name" "$JOBCACHEFS_TRUSTED_REFS"; then
        trusted=true
      fi
      ;;
  esac
  # A pull request event whose number could not be read still never reaches the cache.
  case "$event" in pull_request*) [ -n "$pr" ] || name=${name:-pull-request} ;; esac
  jcfs_decide "$name" "$pr" "$trusted"
}

# GitLab Runner: the mapping from its predefined variables, given as $1 = their prefix ("" in the
# job's shell, "CUSTOM_ENV_" in the custom executor's stages). Merge request pipelines write into
# "pr-<iid>"; the default branch (CI_COMMIT_BRANCH = CI_DEFAULT_BRANCH: a tag of the same name is
# not the branch) and, unless JOBCACHEFS_TRUST_PROTECTED=false, protected refs into the cache.
jcfs_gitlab_target() {
  local p=${1:-} v ref mr branch default protected trusted=false
  v="${p}CI_COMMIT_REF_NAME"; ref=${!v:-}
  v="${p}CI_MERGE_REQUEST_IID"; mr=${!v:-}
  v="${p}CI_COMMIT_BRANCH"; branch=${!v:-}
  v="${p}CI_DEFAULT_BRANCH"; default=${JOBCACHEFS_DEFAULT_BRANCH:-${!v:-}}
  v="${p}CI_COMMIT_REF_PROTECTED"; protected=${!v:-false}
  case "$mr" in *[!0-9]*) mr= ;; esac
  if [ -z "$mr" ]; then
    if [ -n "$branch" ] && [ "$branch" = "$default" ]; then
      trusted=true
    elif [ "$protected" = true ] && [ "${JOBCACHEFS_TRUST_PROTECTED:-true}" != false ]; then
      trusted=true
    elif [ -n "${JOBCACHEFS_TRUSTED_REFS:-}" ] && jcfs_ref_matches "$ref" "$JOBCACHEFS_TRUSTED_REFS"; then
      trusted=true
    fi
  fi
  jcfs_decide "$ref" "$mr" "$trusted"
}

# Buildkite (runners/buildkite/pipeline.sh): BUILDKITE_BRANCH, BUILDKITE_PULL_REQUEST ("false" or
# the number), BUILDKITE_PIPELINE_DEFAULT_BRANCH, BUILDKITE_TAG.
jcfs_buildkite_target() {
  local ref=${BUILDKITE_TAG:-${BUILDKITE_BRANCH:-}} pr=${BUILDKITE_PULL_REQUEST:-false} trusted=false
  local default=${JOBCACHEFS_DEFAULT_BRANCH:-${BUILDKITE_PIPELINE_DEFAULT_BRANCH:-}}
  case "$pr" in "" | false | *[!0-9]*) pr= ;; esac
  if [ -z "$pr" ]; then
    if [ -z "${BUILDKITE_TAG:-}" ] && [ -n "$default" ] && [ "$ref" = "$default" ]; then
      trusted=true
    elif [ -n "${JOBCACHEFS_TRUSTED_REFS:-}" ] && jcfs_ref_matches "$ref" "$JOBCACHEFS_TRUSTED_REFS"; then
      trusted=true
    fi
  fi
  jcfs_decide "$ref" "$pr" "$trusted"
}

# ---------------------------------------------------------------------------------------------
# Volumes on a runner host.

# jcfs_start DIR CACHE: discards whatever a job whose end hook never ran left at DIR (a crash, a
# killed runner: nothing says that job succeeded, so it is never committed), then makes this
# job's volume there — with the scope and write-back of jcfs_decide — owned by the runner's user.
# The volume writes back (into the cache or its scope) only when the end hook asks: its delete
# without --discard.
jcfs_start() {
  local dir=$1 cache=$2 args=() out
  out=$(jcfs volume delete "$dir" --discard -o json) || return
  if ! printf '%s' "$out" | grep -Eq '"outcome": *"not-found"'; then
    echo "jobcachefs: discarded the volume a job left at $dir (its end hook never ran)" >&2
  fi
  args=(volume create "$dir" --cache "$cache" --namespace "${JOBCACHEFS_NAMESPACE:-ci}")
  [ -n "${JCFS_SCOPE:-}" ] && args+=(--scope "$JCFS_SCOPE")
  [ -n "${JOBCACHEFS_SIZE:-}" ] && args+=(--size "$JOBCACHEFS_SIZE")
  [ "${JCFS_WRITE_BACK:-false}" = true ] && args+=(--write-back)
  jcfs "${args[@]}" >/dev/null || return
  # The job runs as the runner's user; the volume's root is root's until given to it. (Kept in
  # the cache by the first commit, so it is the same for every later job of this runner.)
  [ "$(id -u)" = 0 ] || sudo -n chown "$(id -u):$(id -g)" "$dir"
  rm -f "$dir/$JCFS_MARKER"
}

# jcfs_finish DIR commit|discard: deletes the job's volume; with commit, a write-back volume is
# committed into its cache or its scope. The success marker goes first, so it never reaches the
# cache. Prints jobcachefs' JSON outcome; a rejected commit (over the cache's size) is the
# cache's problem, not the job's: exit 0.
jcfs_finish() {
  local dir=$1 how=$2 rc=0
  rm -f "$dir/$JCFS_MARKER" 2>/dev/null || sudo -n rm -f "$dir/$JCFS_MARKER" 2>/dev/null || true
  if [ "$how" = commit ]; then
    jcfs volume delete "$dir" -o json || rc=$?
  else
    jcfs volume delete "$dir" --discard -o json || rc=$?
  fi
  [ "$rc" = 0 ] || [ "$rc" = 3 ]
}

# Whether the job marked its success (a file the job writes as its last step).
jcfs_marked() {
  [ -e "$1/$JCFS_MARKER" ]
}

# Where a job's volume goes and what it reads, for the log.
jcfs_describe() {
  local where="cache ${JOBCACHEFS_NAMESPACE:-ci}/$2"
  [ -n "${JCFS_SCOPE:-}" ] && where="$where, scope $JCFS_SCOPE"
  echo "jobcachefs: $where at $1 (write-back: ${JCFS_WRITE_BACK:-false})"
}

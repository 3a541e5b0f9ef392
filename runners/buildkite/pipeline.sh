#!/usr/bin/env bash
# Buildkite on Kubernetes (agent-stack-k8s): prints the build's pipeline with a jobcachefs inline
# CSI volume at /cache of the command container, for a first step that uploads it:
#   steps:
#     - command: runners/buildkite/pipeline.sh | buildkite-agent pipeline upload
# The `kubernetes` plugin's podSpecPatch is merged into the job's pod by the controller
# (strategic merge: container-0 is the command's container). The scope comes from the build's
# variables through runners/common.sh (jcfs_buildkite_target): pull requests "pr-<n>", the
# default branch none (it writes the cache), other branches their name as a DNS label.
#
# The pod ends when the command has run; the volume commits then, only with the marker that the
# command's last line leaves (`set -e`: it runs only if the build succeeded). This script is the
# repository's, so a branch could change it: only the agents of the controller that builds the
# default branch run under a namespace/service account in [csi] inline_write_back
# (runners/node-config.toml); every other queue's pods write only into scopes.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common.sh"
jcfs_buildkite_target
cache=${JOBCACHEFS_CACHE:-octo-org-app}
cat <<YAML
steps:
  - label: build
    command: |
      set -euo pipefail
      mvn -B -Dmaven.repo.local=/cache/m2 package
      touch /cache/.jobcachefs-success
    plugins:
      - kubernetes:
          podSpecPatch:
            containers:
              - name: container-0
                image: maven:3.9-eclipse-temurin-21
                volumeMounts:
                  - name: jobcachefs
                    mountPath: /cache
            volumes:
              - name: jobcachefs
                csi:
                  driver: csi.jobcachefs.io
                  volumeAttributes:
                    cache: "$cache"
                    size: 4Gi
                    writeBack: "$([ "$JCFS_WRITE_BACK" = true ] && echo on-success || echo false)"
YAML
if [ -n "$JCFS_SCOPE" ]; then
  echo "                    scope: \"$JCFS_SCOPE\""
fi

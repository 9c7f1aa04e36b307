#!/usr/bin/env bash
# Prints the command in README.md's fenced block that follows the marker <!-- ci:NAME -->.
# .ci/run executes exactly these, so the README's commands are the ones CI proves.
set -euo pipefail
name="$1"
awk -v marker="<!-- ci:${name} -->" '
  $0 == marker { found = 1; next }
  found && /^```/ { if (inblock) exit; inblock = 1; next }
  found && inblock { print; }
' "$(dirname "$0")/../README.md"

#!/usr/bin/env bash
# Copies the project's files (tracked, and untracked ones git does not ignore; no build outputs, no venv)
# into DEST, so a run under another Python / torch can load another compiled module there without
# touching this tree's.      scripts/stage_tree.sh DEST
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DEST" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$1" && mkdir -p "$1"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$1")

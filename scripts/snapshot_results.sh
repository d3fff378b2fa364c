#!/usr/bin/env bash
# Copies the small, human-readable outputs of finished runs (table.md, config.json and the PNG plots)
# from results/<name>/ to docs/results/<name>/ so that they can be committed (results/ is ignored).
# Usage: scripts/snapshot_results.sh name [name ...]
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "$@"; do
  src="results/$name"
  [ -f "$src/table.md" ] || { echo "skip $name: no $src/table.md"; continue; }
  mkdir -p "docs/results/$name"
  cp "$src/table.md" "$src/config.json" "docs/results/$name/"
  find "$src" -maxdepth 1 -name '*.png' -exec cp {} "docs/results/$name/" \;
  echo "docs/results/$name"
done

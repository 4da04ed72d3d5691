#!/usr/bin/env bash
# Put the peer libraries that are not on a registry into peers/ (git-ignored), for the benchmarks
# here and for a GPU machine without network (copy peers/ there along with the tree).
#   benchmarks/prepare_peers.sh [SCATTERMOE_CHECKOUT]
# SCATTERMOE_CHECKOUT: a clone of ScatterMoE's public repository (default: clone it, which needs
# network). transformers' experts (`grouped_mm`, `batched_mm`) need nothing here: the benchmarks use
# whatever transformers is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p peers
src=${1:-}
if [ -z "$src" ]; then
  src=$(mktemp -d)
  git clone --depth 1 https://github.com/shawntan/scattermoe "$src"
fi
if [ -d "$src/.git" ] || git -C "$src" rev-parse > /dev/null 2>&1; then
  rm -rf peers/scattermoe
  git -C "$src" archive HEAD scattermoe | tar -x -C peers
  git -C "$src" rev-parse --short HEAD > peers/scattermoe/VERSION
else
  rm -rf peers/scattermoe && cp -r "$src/scattermoe" peers/
fi
echo "peers/: $(ls peers)"

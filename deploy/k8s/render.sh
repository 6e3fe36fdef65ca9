#!/bin/sh
# Render each overlay into deploy/k8s/rendered/ (for `kubectl apply -f` without kustomize, and for review).
# tests/test_k8s.py validates the rendered files and fails if they differ from a fresh render.
set -eu
cd "$(dirname "$0")"
mkdir -p rendered
for overlay in gpu cpu; do
  { echo "# Rendered by deploy/k8s/render.sh from overlays/$overlay: edit the kustomization, not this file."
    kubectl kustomize "overlays/$overlay"; } > "rendered/$overlay.yaml"
done

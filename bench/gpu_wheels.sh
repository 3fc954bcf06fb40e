#!/usr/bin/env bash
# Fill .whl/ (repo root, git-ignored) with the wheels a bare GPU image (CPython 3.12, x86-64, with torch,
# transformers, peft and accelerate already installed) lacks to run the pipeline: DeepSpeed, lm-eval, datasets and
# their missing pure-python dependencies. Run it here, on a machine with the package index, then carry .whl to the
# GPU machine; bench/gpu_session.sh installs it there with --no-index into /tmp/site.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
target=(--only-binary=:all: --python-version 3.12 --implementation cp -d "$dest"
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
for pkg in lm-eval==0.4.13 datasets evaluate dill multiprocess hjson annotated-types typing-inspection more_itertools \
           pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet pytz rouge-score \
           nltk; do
    python3 -m pip download -q --no-deps "${target[@]}" "$pkg"
done
python3 -m pip download -q "${target[@]}" pydantic    # with the pydantic-core build it pins
rm -f "$dest"/typing_extensions-*.whl                 # the image's own is newer
# source-only packages: built here as pure-python wheels
python3 -m pip wheel -q --no-deps -w "$dest" deepspeed==0.19.8 sqlitedict word2number
ls "$dest"

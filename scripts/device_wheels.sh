#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for `make bench-gpu` there (it reaches no package registry).
#
# Its image has Python 3.12, a CUDA torch, numpy, pandas, pyarrow, scikit-learn, matplotlib,
# safetensors and huggingface-hub, but not this project's pins (transformers 5.24 with
# `mm_encoder_outputs`, hydra/omegaconf) nor lmms-eval and what its llava_hf wrapper imports.
# Run here, in the repository root (pip reaches the registries here), then carry `.whl`:
#
#   bash scripts/device_wheels.sh             # writes .whl/ (about 36 MB) and ignores it in git
#   # on the machine, one command (the device tool's `run`, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --out $OUT/bench_gpu
#
# then copy the returned bench_gpu.json to results/bench/gpu/ and run
# `python scripts/update_bench_docs.py`.
set -euo pipefail
DEST=.whl
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux2010_x86_64)
WHEELS=(transformers==5.24.0 tokenizers==0.23.3 hydra-core==1.3.8 omegaconf==2.3.1
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lmms-eval==0.7.3 loguru==0.7.3
        evaluate==0.4.6 pytablewriter==1.2.1 DataProperty mbstrdecoder pathvalidate tabledata
        tcolorpy typepy chardet eva-decord==0.6.1)
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORM[@]}" -d "$DEST" "${WHEELS[@]}"
# omegaconf's parser runtime is published as a source archive only: build its (pure) wheel
python3 -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
du -sh "$DEST"

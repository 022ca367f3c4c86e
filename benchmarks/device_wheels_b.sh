#!/usr/bin/env bash
# The second wheel set a GPU sweep with golden sets and tracking needs on the device machine (lm-eval, MLflow's skinny
# client and tracing, Optuna, plotly, gguf and what they need there), beside benchmarks/device_wheels.sh's `.whl`:
#
#   bash benchmarks/device_wheels_b.sh          # writes .whlb/ (Python 3.12 x86-64); add `echo /.whlb/ >> .git/info/exclude`
#
# The list is the dependency closure of those six, less what the device machine has (its `pip list`, 2026-12-05, H100)
# and what `.whl` carries. A package PyPI ships only as an sdist (sqlitedict, rouge-score, word2number) is built here
# into a wheel (all three are pure Python). benchmarks/smollm2_device.sh's call 2 installs the set.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${WHEELHOUSE:-.whlb}
rm -rf "$out" && mkdir -p "$out"
pkgs=(alembic==1.20.1 cffi==2.1.1 chardet==6.0.0.post1 colorlog==6.12.0 cryptography==50.0.2 databricks-sdk==0.167.0
      dataproperty==1.1.1 defusedxml==0.7.1 evaluate==0.4.6 fastapi==0.165.0 gguf==0.19.0 gitdb==4.0.12
      gitpython==3.2.1 httpcore2==2.17.0 httpx2==2.17.0 importlib-metadata==9.1.0 lm-eval==0.4.13 mako==1.4.3
      mbstrdecoder==1.1.5 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 more-itertools==11.2.1 nltk==3.10.4
      optuna==5.1.0 pathvalidate==3.3.1 plotly==7.1.0 pycparser==3.12 pytablewriter==1.2.1 python-dotenv==1.2.4
      rouge-score==0.1.2 smmap==5.0.3 sqlalchemy==2.1.9 sqlitedict==2.1.0 sqlparse==0.6.1 starlette==1.10.0
      tabledata==1.3.5 tcolorpy==0.1.7 truststore==0.10.5 typepy==1.3.5 uvicorn==0.55.0 word2number==1.1)
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$out" "$p" 2>/dev/null \
    || { echo "$p: no wheel on PyPI, building one"; python3 -m pip wheel -q --no-deps -w "$out" "$p"; }
done
for w in "$out"/*.whl; do  # a wheel built here must be one any Python 3 installs
  case "$w" in *-py3-none-any.whl | *-py2.py3-none-any.whl | *cp312* | *abi3*) ;; *) echo "not for Python 3.12: $w" >&2; exit 1 ;; esac
done
ls "$out" | wc -l && du -ch "$out"/*.whl | tail -1

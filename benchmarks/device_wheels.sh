#!/usr/bin/env bash
# The wheels the GPU machine lacks for lora_search's trial path (Ray, TRL, datasets, DeepSpeed, bitsandbytes,
# py-spy, Liger), slimmed so one device call carries them under its 64 MiB limit.
#
#   bash benchmarks/device_wheels.sh            # writes .whl/ (about 60 MB); add `echo /.whl/ >> .git/info/exclude`
#
# Then carry [".whl"] and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
# Ray's `default` extra is there (less virtualenv, which only runtime_env pip installs use): without it the dashboard
# starts in minimal mode, with no state API, and Ray Train cannot free a finished trial's placement group, so the next
# trial on that GPU waits for ever.
# Slimmed: Ray without rllib, llm and the dashboard's web client sources (its build stays: without it the dashboard
# does not start at all); bitsandbytes with only its CUDA 13.0 library (the machine's torch is cu130).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${WHEELHOUSE:-.whl}
rm -rf "$out"
bash ../shared/device/wheelhouse.sh trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
  py-spy==0.4.3 bitsandbytes==0.50.2 liger-kernel==0.8.5 \
  aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 \
  google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 \
  rsa==4.9.1 cachetools==7.3.3 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  smart_open==9.0.2 >/dev/null
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8  # an sdist: pure-python wheel
python3 - "$out" <<'PY'
import os, sys, zipfile
from pathlib import Path

DROP = {
    "ray": ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/dashboard/client/src/"),
    "bitsandbytes": tuple(f"bitsandbytes/libbitsandbytes_{k}" for k in
                          ("cuda11", "cuda12", "cuda132", "rocm", "xpu")),
}
for wheel in Path(sys.argv[1]).glob("*.whl"):
    name = wheel.name.split("-")[0]
    if name not in DROP:
        continue
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if info.filename.startswith(DROP[name]):
                continue
            data = zi.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not l.decode().startswith(DROP[name]))
            zo.writestr(info, data)
    os.replace(tmp, wheel)
PY
du -ch "$out"/*.whl | tail -1

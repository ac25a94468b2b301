#!/bin/bash
# The checks a session lent a GPU runs, in one command (about 4 minutes on an H200; the timeouts add up to 470 s):
#   bash Testing/Benchmarks/run_gpu_checks.sh OUT_DIR
# the CUDA tests, one profiled sliding window over 300 x 512 x 512 (profile_sliding_window.py), and
# bench_sliding_window.py on its volume and on 300 x 512 x 512. Writes test_cuda.txt, profile.jsonl and
# bench_small.json / bench_large.json to OUT_DIR and prints a summary. Needs torch with CUDA, MONAI and
# DeepSeg's dependencies on PYTHONPATH (DeepSeg itself is found from the source tree).
set -u
out=${1:?usage: run_gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'monai', monai.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rA Testing/core/test_cuda.py >"$out/test_cuda.txt" 2>&1
echo "test_cuda rc=$?"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$out/test_cuda.txt" | tail -n 14
timeout 60 python3 Testing/Benchmarks/profile_sliding_window.py --device cuda --amp --volume-zyx 300 512 512 >"$out/profile.jsonl" 2>"$out/profile.err"
echo "profile rc=$?"
timeout 110 python3 Testing/Benchmarks/bench_sliding_window.py --json --device cuda --repeats 3 >"$out/bench_small.json" 2>"$out/bench_small.err"
echo "bench small rc=$?"
timeout 150 python3 Testing/Benchmarks/bench_sliding_window.py --json --device cuda --repeats 2 --volume-zyx 300 512 512 \
    >"$out/bench_large.json" 2>"$out/bench_large.err"
echo "bench large rc=$?"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for line in (out / "profile.jsonl").read_text().splitlines():
    r = json.loads(line)
    print("profile", r["volume_zyx"], "wall %.3f s" % r["wall_s"], {k: (round(v["host_s"], 3), round(v["device_s"], 3)) for k, v in r["ranges"].items()})
for name in ("bench_small.json", "bench_large.json"):
    r = json.loads((out / name).read_text())
    print(name, {k: r[k] for k in r if k.startswith(("monai_s", "deepseg_s", "ratio", "parts"))})
    print("  backends", {k: round(v["seconds"], 4) for k, v in r["backends"].items()})
PY

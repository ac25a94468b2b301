#!/usr/bin/env bash
# Run DeepSeg's in-Slicer tests (DeepSegTest, DeepSegTrainingTest) in a real 3D Slicer >= 5.10,
# the way `ctest -R py_DeepSeg` runs them from an extension build tree
# (CMake/SlicerMacroPythonTesting.cmake: --no-splash --testing --python-code runUnitTest).
#
#   Testing/Slicer/run_in_slicer.sh /path/to/Slicer            # e.g. ~/Slicer-5.10.0-linux-amd64/Slicer
#
# They drive the real widgets end to end: load the sample, Segment, edit, export two cases, train
# one short epoch, Promote, Roll back. The first run installs DeepSeg's Python packages into that
# Slicer (testing mode accepts the install dialog). Expect, at the end of each module's output:
#   Ran N tests in ...s
#   OK
# CI cannot run them (no Slicer application on the build machines); it runs everything else.
set -euo pipefail
SLICER="${1:?usage: $0 /path/to/Slicer}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
for MODULE in DeepSeg DeepSegTraining; do
  "$SLICER" --no-splash --testing \
    --additional-module-paths "$REPO/DeepSeg" "$REPO/DeepSegTraining" \
    --python-code "import slicer.testing; slicer.testing.runUnitTest(['$REPO/DeepSeg', '$REPO/DeepSegTraining'], '$MODULE')"
done

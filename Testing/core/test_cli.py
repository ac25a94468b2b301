"""The ``deepseg`` command line: real runs in subprocesses and in-process, exit codes, messages."""

from __future__ import annotations

import io as io_module
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from deepseg_core import demo, io
from deepseg_core.cli import EXIT_CANCELLED, EXIT_INPUT, EXIT_MODEL, EXIT_OK, main
from deepseg_core.events import EventSink

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepseg_core", *args], capture_output=True, text=True, cwd=REPO / "DeepSeg")


def test_demo_segments_the_bundled_sample_with_the_bundled_model(tmp_path):
    result = run_cli("demo", "--output", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "model phantom-liver:1" in result.stdout and "Dice vs truth" in result.stdout
    seg = io.read_segmentation(tmp_path / "sample_ct.seg.nrrd")
    image = io.read_image(demo.SAMPLE_VOLUME)
    assert seg.grid.same_grid(image)
    names = [s.name for s in seg.segments]
    assert names[0] == "liver" and len(names) >= 3 and all(n.startswith("liver lesion ") for n in names[1:])
    import SimpleITK as sitk

    preview = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sample_ct_preview.png"))).astype(int)
    liver_rgb = np.round(255 * np.array(seg.segments[0].color_rgb)).astype(int)
    outline = (np.abs(preview - liver_rgb).sum(axis=-1) == 0).sum()
    assert preview.shape[-1] == 3 and outline > 500, "the preview must show the liver outline in its colour"
    assert "Domain check: input looks like the training data." in result.stdout
    stats = (tmp_path / "sample_ct_stats.csv").read_text().splitlines()
    assert stats[1].startswith("liver,1,0,") and sum(r.startswith("liver lesion ") for r in stats) == len(names) - 1


def test_demo_refuses_a_file_as_its_folder_and_replaces_its_files_together_or_not_at_all(tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("the user's notes")
    assert main(["demo", "--output", str(taken), "--device", "cpu"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "the demo's output is not a folder" in err and "an existing file" in err, err
    assert taken.read_text() == "the user's notes"
    earlier = tmp_path / "out" / "sample_ct.seg.nrrd"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier run's segmentation")
    (tmp_path / "out" / "sample_ct_preview.png").mkdir()  # something in the way of the preview
    assert main(["demo", "--output", str(tmp_path / "out"), "--device", "cpu"]) == EXIT_INPUT
    assert "is a folder, not an output file" in capsys.readouterr().err
    assert earlier.read_bytes() == b"an earlier run's segmentation"  # not replaced without its preview and table
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["sample_ct.seg.nrrd", "sample_ct_preview.png"]


def test_bundled_model_segments_the_sample_well():
    """The shipped model must actually work: Dice against the sample's ground truth."""
    summary = demo.run_demo(Path(tempfile.mkdtemp()), device="cpu")
    dice = {seg["name"]: seg["dice"] for seg in summary.segments}
    assert dice["liver"] > 0.9
    assert dice["liver lesion"] > 0.6
    lesions = next(seg for seg in summary.segments if seg["name"] == "liver lesion")
    truth = io.read_segmentation(demo.SAMPLE_TRUTH)
    from scipy import ndimage

    _, true_count = ndimage.label(truth.mask("liver lesion"), structure=np.ones((3, 3, 3)))
    assert abs(lesions["instances"] - true_count) <= 1


def test_a_liver_running_through_the_last_thin_slice_is_segmented_there_too():
    """The sample cropped through the middle of its liver and resampled to 60 slices of 1 mm: the bundled
    model's 2.5 mm grid then has 24 slices, and the input's last slice lies past its last voxel. That
    slice used to come back as background (no liver, entropy 0, as if certain); it must carry the liver
    of the slice before it, and the same entropy."""
    import SimpleITK as sitk

    from deepseg_core.inference import Segmenter, SegmentOptions

    sample = sitk.ReadImage(str(demo.SAMPLE_VOLUME))
    truth = io.read_segmentation(demo.SAMPLE_TRUTH).mask("liver")
    liver_slices = np.flatnonzero(truth.any(axis=(1, 2)))
    cropped = sample[:, :, : int(liver_slices.mean()) + 1]
    thin = sitk.Image([*cropped.GetSize()[:2], 60], sitk.sitkUInt8)
    thin.SetSpacing((*cropped.GetSpacing()[:2], 1.0))
    thin.SetOrigin(cropped.GetOrigin())
    thin.SetDirection(cropped.GetDirection())
    assert cropped.GetSize()[2] * cropped.GetSpacing()[2] == 60.0
    volume = io.Volume.from_sitk(sitk.Resample(cropped, thin, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16, True))
    segmenter = Segmenter.load(demo.DEFAULT_MODEL, device="cpu")
    assert segmenter.card.preprocessing.target_spacing_xyz_mm[2] == 2.5, "the case is built for the bundled model's 2.5 mm slices"
    result = segmenter.segment([volume], SegmentOptions(uncertainty="tta"))
    liver = result.labels.array_zyx == 1
    assert liver[-2].sum() > 1000
    np.testing.assert_array_equal(liver[-1], liver[-2])  # both past the last model slice's centre
    np.testing.assert_array_equal(result.uncertainty.array_zyx[-1], result.uncertainty.array_zyx[-2])
    assert result.uncertainty.array_zyx[-1].max() > 0


def test_phantom_and_compare(tmp_path, capsys):
    assert main(["phantom", "--output", str(tmp_path), "--count", "2", "--shape", "16", "40", "40", "--seed", "3"]) == EXIT_OK
    capsys.readouterr()
    a, b = tmp_path / "phantom_ct-A_0003.seg.nrrd", tmp_path / "phantom_ct-A_0004.seg.nrrd"
    assert main(["compare", str(a), str(a)]) == EXIT_OK
    same = json.loads(capsys.readouterr().out)
    assert same["liver"]["dice"] == 1.0 and same["liver lesion"]["hd95_mm"] == 0.0
    assert main(["compare", str(a), str(b)]) == EXIT_OK
    other = json.loads(capsys.readouterr().out)
    assert 0.0 < other["liver"]["dice"] < 1.0


def test_info_reports_geometry(tmp_path, capsys):
    volume = io.Volume(np.zeros((3, 4, 5), np.int16), spacing_xyz_mm=(0.5, 0.6, 2.0), origin_lps=(1, 2, 3))
    path = io.write_image(volume, tmp_path / "v.nrrd")
    assert main(["info", str(path)]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [3, 4, 5] and info["spacing_xyz_mm"] == [0.5, 0.6, 2.0]


def test_bad_input_exits_2_with_one_clear_message(tmp_path):
    result = run_cli("info", str(tmp_path / "missing.nrrd"))
    assert result.returncode == EXIT_INPUT
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'missing.nrrd'}: file not found. Check the path; DeepSeg never downloads inputs."
    )
    result = run_cli("phantom", "--output", str(tmp_path), "--profile", "nope")
    assert result.returncode == EXIT_INPUT and "one of ['ct-A'" in result.stderr


#: Modules that take a large part of a second to import (scipy.stats 0.6 s, scipy.optimize 0.5 s, pandas,
#: matplotlib) and that a segmentation does not use: imported at the top of a module on its path, every
#: Segment click in Slicer would pay for them before the first event. (scipy.spatial is used: the
#: measurements' k-d tree, after the network has run.)
NOT_IMPORTED_BY_A_SEGMENTATION = ("scipy.stats", "scipy.optimize", "pandas", "matplotlib")


def test_a_segmentation_imports_none_of_the_slow_modules_it_does_not_use(tmp_path):
    """The panel's run of DeepSeg's own model (default backend, per-segment measurements); an imported MONAI
    bundle's network imports MONAI, which imports some of them itself."""
    program = (
        "import json, sys\n"
        "from deepseg_core.cli import main\n"
        "code = main(sys.argv[1:])\n"
        f"print(json.dumps([code, sorted(set(sys.modules) & set({NOT_IMPORTED_BY_A_SEGMENTATION!r}))]))\n"
    )
    sample = REPO / "DeepSeg" / "deepseg_core" / "bundled" / "sample_ct.nrrd"
    output = tmp_path / "sample.seg.nrrd"
    args = ["segment", str(sample), "--model", "phantom-liver", "--output", str(output), "--stats", str(tmp_path / "s.csv")]
    env = {**os.environ, "DEEPSEG_MODELS": str(tmp_path / "store")}
    result = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, env=env, timeout=300)
    code, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == EXIT_OK and output.is_file(), result.stderr
    assert imported == [], f"a segmentation imported {imported}; import them where they are used"


def block_buffered() -> dict[str, str]:
    """This environment without ``PYTHONUNBUFFERED`` (set on this machine): a child's piped stdout is then
    block-buffered, as a pipe is by default, so output lost at exit shows."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


PROGRAM_WITH_A_THREAD_AND_AN_EXIT_HANDLER = """
import atexit, sys, threading, time
from pathlib import Path
from deepseg_core import cli

returned = threading.Event()
real_main = cli.main

def main(argv):
    try:
        return real_main(argv)
    finally:
        returned.set()

def finish_late(path):
    returned.wait(60)
    time.sleep(0.2)
    Path(path).write_text("written by a thread that was still running when main returned")

class TornDown:
    def __del__(self):
        print("the interpreter's objects were torn down")

kept_to_the_end = TornDown()

cli.main = main

threading.Thread(target=finish_late, args=(sys.argv[1],)).start()
atexit.register(lambda: print("an exit handler ran"))
cli.run(sys.argv[2:])
"""


def test_the_program_skips_only_the_teardown_of_an_exit(tmp_path):
    """`run` (``python -m deepseg_core``, the ``deepseg`` script) ends the process without freeing the
    interpreter's objects (an object's finalizer does not run), but joins a thread still working, runs
    exit handlers, delivers piped (block-buffered) output whole and ends with main's code."""
    marker = tmp_path / "thread.txt"
    store = ["--models-dir", str(tmp_path / "store")]

    def program(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", PROGRAM_WITH_A_THREAD_AND_AN_EXIT_HANDLER, str(marker), *args, *store]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO / "DeepSeg", env=block_buffered(), timeout=300)

    listed = program("models", "list", "--json")
    assert listed.returncode == EXIT_OK, listed.stderr
    json_text, _, after = listed.stdout.rpartition("]\n")
    assert [row["name"] for row in json.loads(json_text + "]")] == ["phantom-liver"]
    assert after == "an exit handler ran\n"
    assert marker.read_text().startswith("written by a thread")
    marker.unlink()
    missing = program("models", "activate", "nosuch:1")
    assert missing.returncode == EXIT_MODEL and "unknown model 'nosuch'" in missing.stderr
    assert missing.stdout == "an exit handler ran\n" and marker.exists()


def test_the_program_says_when_its_output_could_not_be_written_or_a_cancel_came_as_main_returned(tmp_path):
    """Output that cannot be written in full (a full disk: ``/dev/full``) is exit code 120 with the reason,
    as Python's own exit gives; a Cancel whose handler runs as main restores it (a KeyboardInterrupt out of
    main) is a cancelled run, 130, not a traceback and death by SIGINT."""
    store = ["--models-dir", str(tmp_path / "store")]
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            listed = subprocess.run(
                [sys.executable, "-m", "deepseg_core", "models", "list", "--json", *store],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO / "DeepSeg",
                env=block_buffered(),
                timeout=300,
            )
        assert listed.returncode == 120 and "the output could not be written in full" in listed.stderr, listed.stderr
    interrupted = "from deepseg_core import cli\n\ndef main(argv):\n    raise KeyboardInterrupt\n\ncli.main = main\ncli.run([])\n"
    cancelled = subprocess.run(
        [sys.executable, "-c", interrupted], capture_output=True, text=True, cwd=REPO / "DeepSeg", timeout=300
    )
    assert cancelled.returncode == EXIT_CANCELLED and cancelled.stderr == "cancelled\n"


class TerminalText(io_module.StringIO):
    """A text stream that says it is a terminal, as a person's stderr is (the bar is drawn only there)."""

    def isatty(self) -> bool:
        return True


def test_a_status_line_starts_on_its_own_line_also_after_an_unfinished_bar():
    err = TerminalText()
    sink = EventSink(json_mode=False, out=io_module.StringIO(), err=err)
    sink.emit({"event": "progress", "case": "ct", "done": 1, "total": 4, "eta_s": 3.0})
    sink.emit({"event": "status", "message": "Preparing the network..."})
    sink.emit({"event": "status", "message": "again"})
    lines = err.getvalue().split("\n")
    assert lines[0].startswith("\rct") and lines[0].endswith("1/4 ETA   3.0s")
    assert lines[1:] == ["Preparing the network...", "again", ""]
    quiet = io_module.StringIO()
    EventSink(json_mode=True, out=quiet, err=err).emit({"event": "status", "message": "x"})
    assert json.loads(quiet.getvalue()) == {"event": "status", "message": "x"}

"""A case's outputs appear together or not at all (issue 12), checked by killing real runs.

Real ``deepseg segment`` runs (bundled model, three outputs) and real ``Dataset.add_case`` calls run
in subprocesses that ``$DEEPSEG_CRASH_AT`` kills with SIGKILL at each step of the commit. Afterwards
the disk must hold the old state (killed before the journal) or, once recovered, every new file,
readable, and no staging folder or journal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepseg_core import io, phantoms
from deepseg_core.cli import EXIT_CANCELLED, EXIT_OK, build_parser
from deepseg_core.cli_segment import case_complete, collect_cases
from deepseg_core.datasets import Dataset, validate_dataset
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.errors import DeepSegError
from deepseg_core.fileutil import (
    CRASH_ENV,
    CRASH_POINTS,
    JOURNAL_PREFIX,
    STAGING_PREFIX,
    cancel_deferred,
    outputs_complete,
    recover_commits,
    staged_commit,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="the crash tests kill with SIGKILL (POSIX)")

REPO = Path(__file__).resolve().parents[2]
KILLED = -getattr(signal, "SIGKILL", 9)
OUTPUT_NAMES = ("case.seg.nrrd", "case_uncertainty.nrrd", "case_stats.csv")


def debris(folder: Path) -> list[str]:
    """Staging folders and journals anywhere under ``folder``."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name.startswith((STAGING_PREFIX, JOURNAL_PREFIX))
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` except commit debris, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith((STAGING_PREFIX, JOURNAL_PREFIX)) for part in p.relative_to(folder).parts)
    }


def engine_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}  # parallel runs share the cores instead of fighting over them


# -- deepseg segment -------------------------------------------------------------------------------


def segment_args(image: Path, folder: Path) -> list[str]:
    return [
        "segment", str(image), "--model", str(DEFAULT_MODEL), "--output", str(folder / OUTPUT_NAMES[0]),
        "--uncertainty", str(folder / OUTPUT_NAMES[1]), "--stats", str(folder / OUTPUT_NAMES[2]), "--device", "cpu", "--json",
    ]  # fmt: skip


def start_segment(image: Path, folder: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deepseg_core", *segment_args(image, folder)],
        cwd=REPO / "DeepSeg",
        env=engine_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def complete(image: Path, folder: Path) -> bool:
    """The CLI's own answer to "are this case's outputs complete on disk?"."""
    args = build_parser().parse_args(segment_args(image, folder))
    return case_complete(args, collect_cases(args.inputs)[0], batch=False)


def assert_outputs_valid(folder: Path, image: Path) -> None:
    grid = io.read_image(image)
    seg = io.read_segmentation(folder / OUTPUT_NAMES[0])
    assert [s.name for s in seg.segments] == ["liver", "liver lesion"] and seg.grid.same_grid(grid)
    assert (seg.mask("liver")).sum() > 1000
    uncertainty = io.read_image(folder / OUTPUT_NAMES[1])
    assert uncertainty.same_grid(grid) and 0.0 <= uncertainty.array_zyx.min() <= uncertainty.array_zyx.max() <= 1.0
    rows = (folder / OUTPUT_NAMES[2]).read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("Segment,Label value,") and rows[1].startswith("liver,1,")


@pytest.fixture(scope="module")
def phantom_image(tmp_path_factory) -> Path:
    case = phantoms.generate_phantom(seed=11, shape_zyx=(24, 64, 64))
    return io.write_image(case.image, tmp_path_factory.mktemp("input") / "case.nrrd")


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, phantom_image) -> dict[str, tuple[Path, int, str, str]]:
    """One run killed at each crash point; they run side by side (inference before the commit is the slow part)."""
    base = tmp_path_factory.mktemp("killed")
    started = {}
    for point in CRASH_POINTS:
        folder = base / point
        folder.mkdir()
        started[point] = (folder, start_segment(phantom_image, folder, **{CRASH_ENV: point}))
    finished = {}
    for point, (folder, process) in started.items():
        out, err = process.communicate(timeout=300)
        finished[point] = (folder, process.returncode, out, err)
    return finished


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_segment_killed_at_each_commit_step_leaves_nothing_or_everything(killed_runs, phantom_image, point):
    folder, code, out, err = killed_runs[point]
    targets = [folder / name for name in OUTPUT_NAMES]
    assert code == KILLED, err
    assert "case_done" not in out  # killed inside the commit, before the case was reported
    assert not complete(phantom_image, folder) and not outputs_complete(targets)
    on_disk = [t.exists() for t in targets]
    if point == "staged":  # before the journal: the old state (nothing), the staging folder is discarded
        assert on_disk == [False, False, False]
        assert debris(folder) and all(d.startswith(STAGING_PREFIX) for d in debris(folder))  # no journal
        report = recover_commits([folder])
        assert report.discarded and not report.finished
        assert sorted(p.name for p in folder.iterdir()) == []
        return
    assert any(d.startswith(JOURNAL_PREFIX) for d in debris(folder))  # the journal says what to finish
    expected_visible = {"journal_written": [False] * 3, "first_renamed": [True, False, False], "renamed": [True] * 3}
    assert on_disk == expected_visible[point]
    if point == "first_renamed":  # the most partial state: recovered by the next run, as a user would
        rerun = start_segment(phantom_image, folder)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == EXIT_OK, err
        assert "interrupted earlier run: finished an interrupted write of" in err
        assert all(name in err.split("finished an interrupted write of")[1] for name in OUTPUT_NAMES)
        assert [json.loads(line)["event"] for line in out.splitlines()][-2:] == ["case_done", "done"]
    else:
        report = recover_commits(targets)
        assert sorted(p.name for p in report.finished) == sorted(OUTPUT_NAMES)
    assert debris(folder) == [] and sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_NAMES)
    assert complete(phantom_image, folder)
    assert_outputs_valid(folder, phantom_image)


def test_sigterm_during_segmentation_writes_nothing_and_exits_130(tmp_path, phantom_image):
    process = start_segment(phantom_image, tmp_path)
    deadline = time.time() + 120
    for line in process.stdout:  # the domain check is reported just before the network runs (12 passes)
        if json.loads(line)["event"] in ("domain_check", "progress") or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    out, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_CANCELLED, stderr
    assert "cancelled" in stderr and "case_done" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging folder, no journal


# -- Dataset.add_case ------------------------------------------------------------------------------

ADD_CASE = """
import sys
import numpy as np
from deepseg_core.datasets import Dataset
from deepseg_core.phantoms import generate_phantom
root, case_id, seed, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
phantom = generate_phantom(seed=seed, shape_zyx=(12, 24, 24), spacing_xyz_mm=(2.0, 2.0, 3.0), n_lesions=2)
labels = phantom.labels.array_zyx.astype(np.uint8)
Dataset.open(root).add_case(case_id, [phantom.image], labels, overwrite=mode == "overwrite")
"""


def small_case(seed: int) -> tuple[io.Volume, np.ndarray]:
    phantom = phantoms.generate_phantom(seed=seed, shape_zyx=(12, 24, 24), spacing_xyz_mm=(2.0, 2.0, 3.0), n_lesions=2)
    return phantom.image, phantom.labels.array_zyx.astype(np.uint8)


@pytest.mark.parametrize("mode", ["new", "overwrite"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_add_case_killed_at_each_commit_step(tmp_path, point, mode):
    dataset = Dataset.create(tmp_path / "ds", "liver", phantoms.PHANTOM_LABELS, ("CT",))
    old_image, old_labels = small_case(0)
    dataset.add_case("other", [old_image], old_labels)  # a bystander that must never change
    if mode == "overwrite":
        dataset.add_case("a", [old_image], old_labels)
    before = snapshot(dataset.root)
    files = [dataset.root / "deepseg.json", dataset.root / "dataset.json", *dataset.image_paths("a"), dataset.label_path("a")]
    killed = subprocess.run(
        [sys.executable, "-c", ADD_CASE, str(dataset.root), "a", "7", mode],
        cwd=REPO / "DeepSeg",
        env=engine_env(**{CRASH_ENV: point}),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == KILLED, killed.stderr
    if point == "staged":
        assert snapshot(dataset.root) == before and debris(dataset.root)  # the old case is intact
    else:
        assert not outputs_complete(files)  # the journal names them: not complete until finished
    assert validate_dataset(dataset.root) == []  # validate opens the dataset, which recovers first
    assert debris(dataset.root) == []
    reopened = Dataset.open(dataset.root)
    after = snapshot(dataset.root)
    assert {k: v for k, v in after.items() if "other" in k} == {k: v for k, v in before.items() if "other" in k}
    if point == "staged":
        assert after == before
        assert ("a" in reopened.cases) is (mode == "overwrite")
        return
    new_image, new_labels = small_case(7)
    images, label = reopened.load_case("a")
    np.testing.assert_array_equal(label.array_zyx, new_labels)
    np.testing.assert_array_equal(images[0].array_zyx, new_image.array_zyx)
    assert sorted(reopened.cases) == ["a", "other"] and outputs_complete(files)


# -- the commit itself, in process -----------------------------------------------------------------


def test_a_failed_write_changes_no_target_and_leaves_no_debris(tmp_path):
    (tmp_path / "sub").mkdir()
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    a.write_text("old a")
    with pytest.raises(RuntimeError, match="writer failed"), staged_commit([a, b]) as commit:
        commit.stage(a).write_text("new a")
        raise RuntimeError("writer failed")
    assert a.read_text() == "old a" and not b.exists() and debris(tmp_path) == []
    with pytest.raises(DeepSegError, match="not every file of the commit was written"), staged_commit([a, b]) as commit:
        commit.stage(a).write_text("new a")
    assert a.read_text() == "old a" and debris(tmp_path) == []
    with staged_commit([a, b]) as commit:
        commit.stage(a).write_text("new a")
        commit.stage(b).write_text("new b")
        assert not recover_commits([tmp_path, tmp_path / "sub"])  # a live writer's staging is left alone
        assert not outputs_complete([a, b])
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and debris(tmp_path) == []
    assert outputs_complete([a, b])


def test_cancel_is_deferred_until_the_block_ends():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt):
            with cancel_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler would have run by now
                reached = True
        assert reached and signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_output_name_taken_by_a_folder_is_refused_before_anything_is_staged(tmp_path, phantom_image):
    # the rename onto a folder fails after the journal: it used to stay, and every later write into that folder
    # failed with "cannot finish an interrupted write"
    taken = tmp_path / OUTPUT_NAMES[1]
    taken.mkdir()
    a = tmp_path / "a.txt"
    a.write_text("old a")
    with pytest.raises(DeepSegError, match="is a folder, not an output file"), staged_commit([a, taken]):
        pytest.fail("the commit must be refused before its block runs")
    assert a.read_text() == "old a" and debris(tmp_path) == []
    # the CLI refuses it before segmenting, and the folder stays usable
    run = start_segment(phantom_image, tmp_path)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2 and "is a folder, not an output file" in err and str(taken) in err
    assert debris(tmp_path) == [] and not (tmp_path / OUTPUT_NAMES[0]).exists()
    taken.rmdir()
    run = start_segment(phantom_image, tmp_path)
    run.communicate(timeout=300)
    assert run.returncode == 0 and debris(tmp_path) == []
    assert_outputs_valid(tmp_path, phantom_image)


def test_a_journal_whose_target_became_a_folder_names_the_folder(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(IsADirectoryError), staged_commit([a, b]) as commit:
        commit.stage(a).write_text("new a")
        commit.stage(b).write_text("new b")
        b.mkdir()  # appears between the check and the rename (another program)
    with pytest.raises(DeepSegError, match="is a folder: rename or remove it, then run again"):
        recover_commits([tmp_path])
    b.rmdir()
    assert recover_commits([tmp_path]).finished == [a, b]
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and debris(tmp_path) == []


def test_a_staging_folder_finished_by_another_process_while_recovery_looks_at_it_is_skipped(tmp_path, monkeypatch):
    # torchrun ranks share an output folder: one rank's recovery lists a staging folder that the other
    # rank's commit then renames and removes. The listing rank failed with FileNotFoundError (CI, 2 workers).
    from deepseg_core import fileutil

    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    staging = tmp_path / f"{fileutil.STAGING_PREFIX}{dead_pid}-abc"
    staging.mkdir()
    (staging / "case.seg.nrrd").write_bytes(b"partial")
    real_journal_of = fileutil._journal_of

    def journal_of_then_finished_elsewhere(folder: Path):
        journal = real_journal_of(folder)
        if folder == staging:
            for child in folder.iterdir():
                child.unlink()
            folder.rmdir()
        return journal

    monkeypatch.setattr(fileutil, "_journal_of", journal_of_then_finished_elsewhere)
    report = recover_commits([tmp_path])
    assert not report.discarded and not report.finished and not staging.exists()

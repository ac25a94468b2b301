"""The DeepSeg panel's plain-Python helpers: model list, event text, first-use install plan."""

from __future__ import annotations

from deepseg_core.model_store import ModelStore
from DeepSegLib.panel_support import available_models, install_plan, missing_packages, progress_text


def test_model_list_has_store_versions_active_first_and_bundled(tmp_path):
    from deepseg_core.demo import DEFAULT_MODEL

    entries = available_models(tmp_path / "store")
    assert [e.label for e in entries] == ["phantom-liver v1 (bundled)"]
    assert "1=liver, 2=liver lesion" in entries[0].description and "Validation Dice: liver 0.998" in entries[0].description
    store = ModelStore(tmp_path / "store")
    store.import_folder(DEFAULT_MODEL)
    entries = available_models(tmp_path / "store")
    assert [e.ref for e in entries] == ["phantom-liver:1"]  # the store's copy replaces the bundled entry
    assert entries[0].label == "phantom-liver v1 (active)" and entries[0].channels == ("CT",)


def test_progress_text():
    assert progress_text({"event": "progress", "done": 9, "total": 18, "eta_s": 3.2}) == (50, "Tile 9/18, about 3 s left")
    assert progress_text({"event": "case_failed", "error": "bad"})[1] == "Failed: bad"


def test_install_plan_asks_for_the_right_torch_build():
    assert missing_packages() == []  # this test environment has everything
    assert install_plan(["torch"], "12.4") == [["torch", "--index-url", "https://download.pytorch.org/whl/cu124"]]
    assert install_plan(["torch"], "12.8")[0][-1].endswith("/cu126")
    assert install_plan(["torch", "slicerio"], None) == [
        ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"],
        ["slicerio"],
    ]

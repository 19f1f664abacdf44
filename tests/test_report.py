"""report.py on hand-made saved results (no training): tables, figures with missing methods, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssimae.compare import save_npz
from ssimae.errors import SsimaeError
from ssimae.report import FORMAT, load_results, metrics_csv, metrics_markdown, write_report

HEADLINE = {"pixel_auroc": 0.9, "au_pro": 0.5, "image_auroc": None, "pixel_f1_max": 0.25}
DECISIONS = {"pixel_f1": 0.2, "image_accuracy": 0.75, "image_accuracy_best": 0.8, "image_precision": 0.6,
             "image_recall": 1.0, "good_images_flagged": 0.5, "validation": {"pixel_fpr": 0.01, "images": 4,
                                                                           "images_with_false_region": 0.25,
                                                                           "image_fpr": 0.0}}


def fake_run(root: Path, methods: list[str], example_keys: tuple[str, ...] = ()) -> Path:
    """A compare output folder with the files write_report reads, for `methods`."""
    rng = np.random.default_rng(0)
    results, curves = {}, {}
    for method in methods:
        pick = {"path": "crack/000.png", "defect_type": "crack", "score": 0.5, "pixel_auroc": 0.8, "iou": 0.1,
                "file": f"examples/data/{method}_best_1.npz"}
        save_npz(root / pick["file"], input=rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
                 overlay=rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), ground_truth=np.eye(20, 30, dtype=bool))
        results[method] = {
            "metrics": {**HEADLINE, **DECISIONS, "images": 5, "good_images": 2,
                        "per_defect_type": {"crack": {**HEADLINE, "images": 3}}},
            "training": {"seconds": 150.0, "steps": 7, "epochs": 1, "checkpoint": "x.pt", "reused": False,
                         "threshold": 0.1, "fidelity_corr": 0.01, "detail_ratio": 0.2},
            "evaluation_seconds": 1.0, "per_image": [], "picks": {"best": [pick], "worst": []},
        }
        curves[f"{method}.roc_fpr"] = curves[f"{method}.roc_tpr"] = np.linspace(0, 1, 50)
        curves[f"{method}.pro_fpr"], curves[f"{method}.pro_value"] = np.linspace(0, 0.3, 20), np.linspace(0, 0.9, 20)
    examples = []
    if example_keys:
        arrays = {"input": rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "ground_truth": np.eye(40, 60, dtype=bool)}
        for key in example_keys:
            arrays[key] = (rng.integers(0, 255, (40, 60, 1), dtype=np.uint8) if key.endswith("reconstruction")
                           else rng.random((40, 60)) > 0.5 if key.endswith("segmentation")
                           else rng.random((40, 60)).astype(np.float16))
        save_npz(root / "examples/data/example_1_best.npz", **arrays)
        examples.append({"rank": "best", "ranked_by": methods[0], "path": "crack/000.png", "defect_type": "crack",
                         "pixel_auroc": 0.8, "file": "examples/data/example_1_best.npz",
                         "figure": "examples/1_best_000.png"})
    saved = {"format": FORMAT, "version": "test", "dataset": "data/<tiny>", "methods": methods, "fpr_limit": 0.3,
             "settings": {"epochs": 200, "max_steps": 7, "max_minutes": None, "patch_size": 128},
             "results": results, "examples": examples}
    (root / "metrics.json").write_text(json.dumps(saved))
    save_npz(root / "curves.npz", **curves)
    return root


def test_markdown_and_csv_tables(tmp_path):
    results, _ = load_results(fake_run(tmp_path, ["ssim-ae", "vae"]))
    markdown = metrics_markdown(results)
    assert "| ssim-ae | 0.9000 | 0.5000 | n/a | 0.2500 | 2.5 min | 7 |" in markdown
    assert "| crack | 3 | vae | 0.9000 | 0.5000 | n/a | 0.2500 |" in markdown
    assert "| vae | 0.2000 | 0.2500 | 0.7500 | 0.8000 | 0.6000 | 1.0000 | 0.5000 | 0.0100 |" in markdown
    lines = metrics_csv(results).splitlines()
    assert lines[0] == ("method,subset,images,pixel_auroc,au_pro,image_auroc,pixel_f1_max,pixel_f1,image_accuracy,"
                        "image_accuracy_best,image_precision,image_recall,good_images_flagged,training_seconds,steps")
    assert lines[1] == "ssim-ae,all,5,0.900000,0.500000,,0.250000,0.200000,0.750000,0.800000,0.600000,1.000000,0.500000,150.0,7"
    assert lines[2] == "ssim-ae,crack,3,0.900000,0.500000,,0.250000,,,,,,,,"
    assert len(lines) == 5


def test_only_l2_draws_the_l2_columns_without_the_ssim_row(tmp_path):
    run = fake_run(tmp_path / "l2", ["l2-ae"], ("l2_reconstruction", "l2_residual", "l2_segmentation"))
    both = fake_run(tmp_path / "both", ["ssim-ae", "l2-ae"], (
        "l2_reconstruction", "l2_residual", "l2_segmentation", "ssim_reconstruction", "ssim_residual",
        "ssim_segmentation", "ssim_luminance", "ssim_contrast", "ssim_structure"))
    write_report(run)
    write_report(both)
    with Image.open(run / "examples/1_best_000.png") as one, Image.open(both / "examples/1_best_000.png") as two:
        assert one.width < two.width and one.height < two.height  # 5 columns, 1 row vs 8 columns, 2 rows
    page = (run / "report.html").read_text()
    assert "L2 versus SSIM" in page and 'class="warn"' in page  # fidelity 0.01 is flagged


def test_report_without_paper_methods_has_no_comparison_rows(tmp_path):
    run = fake_run(tmp_path, ["vae", "fm-ae"])
    page = write_report(run).read_text()
    assert "L2 versus SSIM" not in page and "fm-ae" in page
    assert not list(run.glob("examples/*.png"))


def test_an_evaluate_metrics_file_is_not_a_compare_result(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"pixel_auroc": 0.9}))
    with pytest.raises(SsimaeError, match="is not the result of `ssimae compare`"):
        write_report(tmp_path)


def test_missing_saved_files_are_named(tmp_path):
    run = fake_run(tmp_path, ["ssim-ae"])
    (run / "examples/data/ssim-ae_best_1.npz").unlink()
    with pytest.raises(SsimaeError, match="ssim-ae_best_1.npz is missing"):
        write_report(run)
    (run / "curves.npz").unlink()
    with pytest.raises(SsimaeError, match="no curves.npz"):
        write_report(run)
    (run / "curves.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(SsimaeError, match="curves.npz is damaged"):
        write_report(run)
    with pytest.raises(SsimaeError, match="does not exist"):
        write_report(tmp_path / "nothere")


def test_the_report_names_methods_below_the_no_network_floor(tmp_path):
    from ssimae.report import floor_margins, floor_sentence

    run = fake_run(tmp_path, ["ssim-ae", "patchcore", "blur"])
    results = json.loads((run / "metrics.json").read_text())
    results["results"]["ssim-ae"]["metrics"]["au_pro"] = 0.4
    results["results"]["patchcore"]["metrics"]["au_pro"] = 0.8
    results["results"]["blur"]["metrics"]["au_pro"] = 0.6
    (run / "metrics.json").write_text(json.dumps(results))
    assert floor_margins(results) == pytest.approx({"ssim-ae": -0.2, "patchcore": 0.2})
    assert floor_sentence(results).startswith("Below the no-network floor (blur, AU-PRO 0.600): ssim-ae.")
    page = write_report(run).read_text()
    assert "AU-PRO vs floor" in page and "-0.200" in page and "+0.200" in page
    results["results"]["ssim-ae"]["metrics"]["au_pro"] = None  # unknown is neither above nor below
    assert floor_sentence(results) == "Above the no-network floor (blur, AU-PRO 0.600): patchcore."
    results["results"]["blur"]["metrics"]["au_pro"] = None
    assert floor_sentence(results) == ""
    assert "Below the no-network floor" in (run / "metrics.md").read_text()


def test_the_floor_sentence_explains_an_ssim_ae_below_the_floor_by_its_fidelity(tmp_path):
    from ssimae.report import FLAT_SSIM_AE, RECONSTRUCTING_SSIM_AE, floor_sentence

    results = json.loads((fake_run(tmp_path, ["ssim-ae", "l2-ae", "blur"]) / "metrics.json").read_text())
    for method, au_pro in (("ssim-ae", 0.4), ("l2-ae", 0.5), ("blur", 0.6)):
        results["results"][method]["metrics"]["au_pro"] = au_pro
    results["results"]["ssim-ae"]["training"]["fidelity_corr"] = 0.02
    assert floor_sentence(results).endswith(FLAT_SSIM_AE)
    results["results"]["ssim-ae"]["training"]["fidelity_corr"] = 0.9  # reconstructs: the other explanation
    assert FLAT_SSIM_AE not in floor_sentence(results) and floor_sentence(results).endswith(RECONSTRUCTING_SSIM_AE)
    del results["results"]["ssim-ae"]["training"]["fidelity_corr"]  # unknown: no explanation
    assert floor_sentence(results).endswith("less than a filter residual does on these images.")
    results["results"]["ssim-ae"]["training"]["fidelity_corr"] = 0.02
    results["results"]["ssim-ae"]["metrics"]["au_pro"] = 0.7  # above the floor: nothing to explain
    assert floor_sentence(results) == "Below the no-network floor (blur, AU-PRO 0.600): l2-ae. Their maps find " \
        "less than a filter residual does on these images."


@pytest.mark.parametrize("damage, named", [
    (lambda saved: saved.pop("results"), "missing 'results'"),
    (lambda saved: saved["results"]["vae"]["metrics"].pop("au_pro"), "missing 'au_pro'"),
    (lambda saved: saved["results"].pop("vae"), "missing 'vae'"),
    (lambda saved: saved.update(methods="vae"), "incomplete or damaged"),
])
def test_incomplete_saved_results_are_one_clear_error_and_leave_the_old_report(tmp_path, damage, named):
    run = fake_run(tmp_path, ["ssim-ae", "vae", "blur"])
    write_report(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    saved = json.loads((run / "metrics.json").read_text())
    damage(saved)
    (run / "metrics.json").write_text(json.dumps(saved))
    with pytest.raises(SsimaeError, match="incomplete or damaged") as info:
        write_report(run)
    assert named in str(info.value) and "rerun `ssimae compare" in str(info.value)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "metrics.json"}
    assert after == {p: b for p, b in before.items() if p.name != "metrics.json"}  # nothing rewritten


def test_curves_without_a_method_are_named(tmp_path):
    run = fake_run(tmp_path, ["ssim-ae", "blur"])
    curves = dict(np.load(run / "curves.npz"))
    del curves["blur.roc_fpr"]
    save_npz(run / "curves.npz", **curves)
    with pytest.raises(SsimaeError, match="missing 'blur.roc_fpr'"):
        write_report(run)


def test_saved_files_that_are_not_what_they_claim_are_named(tmp_path):
    run = fake_run(tmp_path, ["ssim-ae"])
    (run / "curves.npz").write_text("just text\n")
    with pytest.raises(SsimaeError, match="curves.npz is damaged") as info:
        write_report(run)
    assert "allow_pickle" not in str(info.value)  # numpy's advice is wrong for a foreign file
    (run / "metrics.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SsimaeError, match="metrics.json is not valid JSON \\(not UTF-8 text\\)"):
        write_report(run)

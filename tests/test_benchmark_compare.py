"""`tools/benchmark.py --compare`: which numbers of two runs are compared, and when a change
counts as a regression (d2seg/benchmark/compare.py)."""
import copy
import importlib.util
import json
import os

import pytest

from d2seg.benchmark.compare import compare_results, format_comparison

from conftest import REPO

UNET_CPU = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation", "unet_cpu.yaml")
MACHINE = "2-core CPU, no GPU: test CPU (1 torch threads; torch 2.x)"


def _result(speedup=1.10, ips=2.0, ref_ips=None, syncs=3, loop=0.95, target="pass",
            summary=MACHINE, **settings):
    """A minimal tools/benchmark.py result with one case and one reference."""
    ref_ips = ips / speedup if ref_ips is None else ref_ips
    s = {"device": "cpu", "precision": "bf16", "batch": 2, "size": [64, 64], "threads": 1,
         "opts": [], "ref_backend": "plain", "instances_per_image": 4, "statistic": "median"}
    s.update(settings)

    def sub(name, v, n):
        return {"name": name, "train_step": {"img_per_s": v},
                "inference": {"latency_batch1_ms": 100.0 / v, "throughput_img_per_s": v},
                "train_memory": {"peak_rss_delta_mb": 300.0}, "host_syncs": {"per_step": n}}
    return {"machine": {"summary": summary, "date": "2026-11-27"}, "settings": s,
            "command": "benchmark.py", "cases": [{
                "name": "unet", "config": "configs/x/unet.yaml", "case_opts": [],
                "d2seg": sub("d2seg unet", ips, syncs), "references": [sub("plain", ref_ips, 2)],
                "ratios": {"plain": {"train_step_speedup": speedup}},
                "loop": {"fraction_of_step": loop}}],
            "targets": [{"name": "speed-up", "kind": "speedup", "case": "unet",
                         "value": speedup, "status": target}]}


def _rows(cmp, **match):
    return [r for r in cmp["rows"] if all(r[k] == v for k, v in match.items())]


def test_identical_runs_have_no_regression():
    old = _result()
    cmp = compare_results(old, copy.deepcopy(old))
    assert cmp["same_machine"] and not cmp["settings_differ"]
    assert cmp["regressions"] == 0 and cmp["improvements"] == 0
    assert {r["status"] for r in cmp["rows"]} == {"ok"}
    kinds = {r["kind"] for r in cmp["rows"]}
    assert kinds == {"ratio", "absolute", "target"}


def test_a_lower_speedup_beyond_the_tolerance_is_a_regression():
    old, new = _result(speedup=1.50), _result(speedup=1.30, target="FAIL")
    cmp = compare_results(old, new, tolerance=0.05)
    (row,) = _rows(cmp, metric="train step speed-up")
    assert row["status"] == "regression" and row["change"] == pytest.approx(1.30 / 1.50 - 1)
    (tgt,) = _rows(cmp, kind="target")
    assert tgt["status"] == "regression" and "pass -> FAIL" in tgt["metric"]
    # within the tolerance: not counted
    cmp = compare_results(old, _result(speedup=1.46), tolerance=0.05)
    assert _rows(cmp, metric="train step speed-up")[0]["status"] == "ok"
    assert "**regression**" in format_comparison(compare_results(old, new))


def test_lower_is_better_for_latency_memory_and_syncs():
    old, new = _result(), _result(syncs=4)
    new["cases"][0]["d2seg"]["train_memory"]["peak_rss_delta_mb"] = 400.0
    new["cases"][0]["d2seg"]["inference"]["latency_batch1_ms"] *= 1.2
    cmp = compare_results(old, new)
    d2 = {r["metric"]: r["status"] for r in _rows(cmp, subject="d2seg", kind="absolute")}
    assert d2["host syncs/step"] == "regression"  # one more sync is one too many
    assert d2["train peak MB"] == "approximate"  # the sampled CPU RSS: shown, not counted
    assert d2["latency b1 ms"] == "regression"
    assert cmp["regressions"] == 2
    # CUDA's allocator peak is exact: counted, lower is better
    for r, mb in ((old, 1000.0), (new, 800.0)):
        r["cases"][0]["d2seg"]["train_memory"] = {"peak_allocated_delta_mb": mb}
    cmp = compare_results(old, new)
    assert _rows(cmp, subject="d2seg", metric="train peak MB")[0]["status"] == "improvement"


def test_a_references_own_numbers_are_shown_not_counted():
    """The references are the yardstick: their absolute numbers moving says the machine or
    torch changed, not d2seg (a faster yardstick shows in the speed-up rows). d2seg's own
    img/s counts only when its ratio to the references moved too."""
    def infer(r, d2_ips, ref_ips):
        c = r["cases"][0]
        c["d2seg"]["inference"]["throughput_img_per_s"] = d2_ips
        c["references"][0]["inference"]["throughput_img_per_s"] = ref_ips
        c["ratios"]["plain"]["inference_throughput_speedup"] = d2_ips / ref_ips
        return r

    old = infer(_result(), 2.0, 2.0)
    new = infer(_result(), 2.0, 1.6)
    new["cases"][0]["references"][0]["train_step"]["img_per_s"] *= 1.3
    cmp = compare_results(old, new)
    ref = {r["metric"]: r["status"] for r in _rows(cmp, subject="plain", kind="absolute")}
    assert ref["infer img/s"] == "reference moved" and ref["train img/s"] == "reference moved"
    assert ref["latency b1 ms"] == "ok"
    assert _rows(cmp, metric="inference throughput speed-up")[0]["status"] == "improvement"
    # d2seg alone slower: its ratio fell, both rows count
    cmp = compare_results(old, infer(_result(), 1.6, 2.0))
    assert _rows(cmp, subject="d2seg", metric="infer img/s")[0]["status"] == "regression"
    assert _rows(cmp, metric="inference throughput speed-up")[0]["status"] == "regression"
    assert cmp["regressions"] == 2
    # both slower alike: the ratio held, the machine moved; nothing counts
    cmp = compare_results(old, infer(_result(), 1.6, 1.6))
    assert _rows(cmp, subject="d2seg", metric="infer img/s")[0]["status"] == "ratio held"
    assert _rows(cmp, metric="inference throughput speed-up")[0]["status"] == "ok"
    assert cmp["regressions"] == 0 and cmp["improvements"] == 0


def test_a_change_inside_the_measurements_spread_is_within_noise():
    """The train step's rounds and the latency calls give each number a spread (median
    against best); a change smaller than it is not counted."""
    old, new = _result(), _result(ips=1.8)  # 10 % fewer img/s, same speed-up
    for r in (old, new):
        r["cases"][0]["d2seg"]["train_step"]["round_seconds"] = [1.0, 1.2, 1.25, 1.3]
    cmp = compare_results(old, new)
    (row,) = _rows(cmp, subject="d2seg", metric="train img/s")
    assert row["noise"] == pytest.approx(0.225) and row["status"] == "within noise"
    for r in (old, new):
        r["cases"][0]["d2seg"]["train_step"]["round_seconds"] = [1.0, 1.01, 1.02]
    (row,) = _rows(compare_results(old, new), subject="d2seg", metric="train img/s")
    assert row["status"] == "ratio held"  # the reference slowed as much: the machine
    new = _result(ips=1.8, speedup=1.8 / (2.0 / 1.10), ref_ips=2.0 / 1.10)  # d2seg alone
    new["cases"][0]["d2seg"]["train_step"]["round_seconds"] = [1.0, 1.01, 1.02]
    cmp = compare_results(old, new)
    (row,) = _rows(cmp, subject="d2seg", metric="train img/s")
    assert row["status"] == "regression"
    assert _rows(cmp, metric="train step speed-up")[0]["status"] == "regression"
    # the inference throughput's spread: seconds per call of its two timed blocks
    old, new = _result(), _result()
    new["cases"][0]["d2seg"]["inference"]["throughput_img_per_s"] *= 0.9
    for r in (old, new):
        r["cases"][0]["d2seg"]["inference"]["throughput_blocks"] = [
            {"calls": 5, "seconds": 1.0}, {"calls": 5, "seconds": 1.3}]
    (row,) = _rows(compare_results(old, new), subject="d2seg", metric="infer img/s")
    assert row["noise"] == pytest.approx(0.15) and row["status"] == "within noise"
    # the speed-up's spread: its value from the median rounds against the best rounds
    old, new = _result(speedup=1.5), _result(speedup=1.3)
    old["cases"][0]["ratios"]["plain"].update(train_step_speedup_best=1.5,
                                              train_step_speedup_median=1.2)
    (row,) = _rows(compare_results(old, new), metric="train step speed-up")
    assert row["noise"] == pytest.approx(0.2) and row["status"] == "within noise"


def test_absolute_numbers_only_on_the_same_machine():
    old = _result(ips=2.0)
    new = _result(ips=1.0, summary="1x NVIDIA H100 80GB HBM3 (torch 2.11, CUDA 12.8)")
    cmp = compare_results(old, new)
    assert not cmp["same_machine"]
    assert {r["status"] for r in _rows(cmp, kind="absolute")} == {"other machine"}
    assert _rows(cmp, metric="train step speed-up")[0]["status"] == "ok"  # same ratio
    assert cmp["regressions"] == 0
    assert "Other machine" in format_comparison(cmp)


def test_different_experiments_never_count_as_regressions():
    old, new = _result(speedup=2.0), _result(speedup=1.0, precision="fp32", batch=4)
    cmp = compare_results(old, new)
    assert cmp["settings_differ"] == {"precision": ["bf16", "fp32"], "batch": [2, 4]}
    assert cmp["regressions"] == 0
    assert _rows(cmp, metric="train step speed-up")[0]["status"] == "settings differ"
    with pytest.raises(ValueError, match="tolerance"):
        compare_results(old, new, tolerance=-1)
    # a JSON from before a setting existed ran with the harness's default
    new = _result()
    for key in ("statistic", "ref_backend"):
        del old["settings"][key]
    old["settings"]["precision"] = "bf16"
    old["settings"]["batch"] = 2
    assert compare_results(old, new)["settings_differ"] == {}


def test_inference_with_other_weights_is_not_compared():
    """A run where the reference inferred with d2seg's weights is not compared, for its
    inference numbers, with one where it used its own (a detector's work differs)."""
    old, new = _result(), _result()
    for r in (old, new):
        r["cases"][0]["ratios"]["plain"]["latency_speedup"] = 1.0
    new["cases"][0]["references"][0]["inference"]["weights"] = "d2seg's"
    new["cases"][0]["references"][0]["inference"]["latency_batch1_ms"] *= 2
    new["cases"][0]["ratios"]["plain"]["latency_speedup"] = 2.0
    cmp = compare_results(old, new)
    assert _rows(cmp, metric="latency speed-up")[0]["status"] == "method changed"
    assert _rows(cmp, subject="plain", metric="latency b1 ms")[0]["status"] == "method changed"
    assert _rows(cmp, subject="plain", metric="train img/s")[0]["status"] == "ok"
    assert cmp["regressions"] == 0 and cmp["improvements"] == 0
    # both runs lent the weights: compared as usual
    old["cases"][0]["references"][0]["inference"]["weights"] = "d2seg's"
    cmp = compare_results(old, new)
    assert _rows(cmp, metric="latency speed-up")[0]["status"] == "improvement"


def test_cases_match_by_name_or_by_config():
    old, new = _result(), _result(speedup=1.0)
    new["cases"][0]["name"] = "unet_cpu"  # a --config-file run of the preset's config
    assert _rows(compare_results(old, new), metric="train step speed-up")[0]["case"] == \
        "unet_cpu"
    new["cases"][0]["config"] = "configs/other.yaml"
    cmp = compare_results(old, new)
    assert not _rows(cmp, kind="ratio") and cmp["unmatched_cases"] == ["unet_cpu"]
    assert "Not in the old run" in format_comparison(cmp)


def _cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli",
                                                  os.path.join(REPO, "tools", "benchmark.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_compares_a_new_run_and_two_files(tmp_path, capsys):
    cli = _cli()
    first, second = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    tiny = ["--config-file", UNET_CPU, "--refs", "plain_unet", "--device", "cpu",
            "--precision", "fp32", "--batch", "1", "--size", "32", "--warmup", "1",
            "--iters", "1", "--repeats", "1", "--threads", "1", "--no-inference",
            "--loop-iters", "0"]
    opts = ["MODEL.UNET.BASE_CHANNELS", "4", "MODEL.UNET.DEPTH", "2"]  # trailing KEY VALUE
    cli.main(tiny + ["--json", first] + opts)
    res = cli.main(tiny + ["--json", second, "--compare", first, "--tolerance", "10"] + opts)
    cmp = res["comparison"]
    assert cmp["same_machine"] and not cmp["settings_differ"]
    assert cmp["old"]["file"] == first and cmp["regressions"] == 0
    assert _rows(cmp, metric="train step speed-up", subject="vs plain_unet")
    with open(second) as f:
        assert json.load(f)["comparison"]["rows"] == cmp["rows"]
    # two earlier runs, nothing measured: a doubled baseline speed-up is a regression
    with open(first) as f:
        old = json.load(f)
    old["cases"][0]["ratios"]["plain_unet"]["train_step_speedup"] *= 2
    baseline = str(tmp_path / "baseline.json")
    with open(baseline, "w") as f:
        json.dump(old, f)
    out = str(tmp_path / "cmp.json")
    with pytest.raises(SystemExit) as e:
        cli.main(["--compare", baseline, "--against", first, "--fail-on-regression",
                  "--json", out])
    assert e.value.code == 3
    with open(out) as f:
        assert json.load(f)["regressions"] >= 1
    assert "regression" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a tools/benchmark.py JSON"):
        cli.main(["--compare", out, "--against", first])
    with pytest.raises(SystemExit, match="--compare"):
        cli.main(["--compare", str(tmp_path / "missing.json"), "--against", first])
    with pytest.raises(SystemExit, match="needs --compare"):
        cli.main(["--against", first])


def test_failed_missing_and_other_cases_are_not_silent():
    """A case that ran and now fails, or is missing from a run of the same preset, is a
    regression; a reference that ran and is missing is shown; a namesake with another config
    or other options is not compared (it was, by name)."""
    old = dict(_result(), preset="cpu-record")
    old["cases"][0]["case_opts"] = ["D2SEG.SHAPES.NUM_TRAIN", "8"]  # a preset case's options
    for record in ({"case_opts": ["D2SEG.SHAPES.NUM_TRAIN", "8"]}, {}):  # {}: an older JSON
        failed = dict(_result(), preset="cpu-record")
        failed["cases"][0] = dict({"name": "unet", "config": "configs/x/unet.yaml",
                                   "error": "RuntimeError: boom"}, **record)
        cmp = compare_results(old, failed)
        (row,) = _rows(cmp, metric="case ran")
        assert row["status"] == "regression" and row["new"] == "error"
        assert cmp["regressions"] >= 1 and not _rows(cmp, metric="config + options")
    old["cases"][0]["case_opts"] = []
    assert "| error |" in format_comparison(cmp)
    gone = dict(_result(), preset="cpu-record", cases=[])
    assert _rows(compare_results(old, gone), metric="case ran")[0]["status"] == "regression"
    other_preset = dict(_result(), preset="", cases=[])
    assert _rows(compare_results(old, other_preset), metric="case ran")[0]["status"] == "not run"
    no_ref = dict(_result(), preset="cpu-record")
    no_ref["cases"][0]["references"] = []
    no_ref["cases"][0]["ratios"] = {}
    no_ref["cases"][0]["skipped_references"] = {"plain": "not installed"}
    cmp = compare_results(old, no_ref)
    (row,) = _rows(cmp, metric="reference ran")
    assert row["status"] == "missing reference" and row["new"] == "not installed"
    assert cmp["missing_references"] == 1
    # the same config with other options (a switch's A/B): side by side, nothing counted
    other = _result(speedup=0.5)
    other["cases"][0]["case_opts"] = ["D2SEG.SPEED.RCNN_SYNC_FREE", "off"]
    cmp = compare_results(_result(), other)
    assert _rows(cmp, metric="config + options")[0]["status"] == "settings differ"
    (row,) = _rows(cmp, metric="train step speed-up")
    assert row["status"] == "settings differ" and row["new"] == 0.5
    assert cmp["regressions"] == 0
    # another config under the same name: not compared at all
    other["cases"][0]["config"] = "configs/x/other.yaml"
    cmp = compare_results(_result(), other)
    assert not _rows(cmp, kind="ratio") and cmp["regressions"] == 0
    assert _rows(cmp, metric="config + options")[0]["status"] == "settings differ"


def test_preset_options_given_as_trailing_opts_match_the_preset_case():
    old = _result()
    old["cases"][0]["case_opts"] = ["D2SEG.SHAPES.NUM_TRAIN", "8"]
    new = _result(opts=["D2SEG.SHAPES.NUM_TRAIN", "8"])
    new["cases"][0]["name"] = "unet_cpu"
    cmp = compare_results(old, new)
    assert cmp["settings_differ"] == {}
    assert _rows(cmp, metric="train step speed-up")[0]["status"] == "ok"


def test_inference_and_loop_settings_block_only_their_rows():
    old, new = _result(), _result(infer_batch=8, loop_iters=30)
    new["cases"][0]["d2seg"]["inference"]["throughput_img_per_s"] *= 2
    new["cases"][0]["loop"]["fraction_of_step"] = 0.5
    cmp = compare_results(old, new)
    d2 = {r["metric"]: r["status"] for r in _rows(cmp, subject="d2seg")}
    assert d2["infer img/s"] == "settings differ" and d2["loop / step"] == "settings differ"
    assert d2["train img/s"] == "ok" and cmp["regressions"] == 0 and cmp["improvements"] == 0


def test_cli_exits_4_when_a_case_failed(tmp_path, monkeypatch, capsys):
    cli = _cli()

    def fake_run(cases, settings, targets, preset="", scaling=None):
        ok = _result()["cases"][0]
        return {"machine": {"summary": MACHINE}, "settings": {"device": "cpu"},
                "cases": [ok, {"name": "unet2", "config": "c.yaml", "error": "RuntimeError: x"}],
                "targets": []}

    monkeypatch.setattr(cli, "run_benchmark", fake_run)
    monkeypatch.setattr(cli, "format_report", lambda r: "report")
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "cpu-smoke", "--json", str(tmp_path / "r.json")])
    assert e.value.code == 4
    assert "1 part(s) failed: unet2" in capsys.readouterr().err
    assert json.load(open(tmp_path / "r.json"))["cases"][1]["error"] == "RuntimeError: x"


def test_a_failed_loop_or_d2seg_inference_fails_the_run_and_its_target_regresses(tmp_path,
                                                                                 monkeypatch,
                                                                                 capsys):
    """The step numbers stand, but the run did not succeed (exit 4); a target that passed in
    the baseline and is "not measured" now is a regression."""
    cli = _cli()

    def fake_run(cases, settings, targets, preset="", scaling=None):
        case = _result()["cases"][0]
        case["loop"] = {"error": "RuntimeError: loader died"}
        case["d2seg"]["inference_error"] = "RuntimeError: oom"
        return {"machine": {"summary": MACHINE}, "settings": {"device": "cpu"},
                "cases": [case], "targets": []}

    monkeypatch.setattr(cli, "run_benchmark", fake_run)
    monkeypatch.setattr(cli, "format_report", lambda r: "report")
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "cpu-smoke", "--json", str(tmp_path / "r.json")])
    assert e.value.code == 4
    assert "2 part(s) failed: unet (train_net loop), unet (d2seg inference)" in \
        capsys.readouterr().err
    new = _result(target="not measured")
    (tgt,) = _rows(compare_results(_result(), new), kind="target")
    assert tgt["status"] == "regression"


def test_fail_on_regression_also_fails_when_nothing_was_compared_like_for_like(tmp_path,
                                                                               capsys):
    """A reference of the baseline that did not run (its targets unchecked), or other
    settings (every row "settings differ"): --fail-on-regression exits 3 and says why."""
    cli = _cli()
    base = str(tmp_path / "base.json")
    with open(base, "w") as f:
        json.dump(_result(), f)
    for name, new in (("noref", _result()), ("warmup", _result(warmup=1))):
        if name == "noref":
            new["cases"][0]["references"] = []
            new["cases"][0]["ratios"] = {}
            new["cases"][0]["skipped_references"] = {"plain": "not installed"}
        path = str(tmp_path / f"{name}.json")
        with open(path, "w") as f:
            json.dump(new, f)
        with pytest.raises(SystemExit) as e:
            cli.main(["--compare", base, "--against", path, "--fail-on-regression",
                      "--json", str(tmp_path / f"cmp_{name}.json")])
        assert e.value.code == 3
        err = capsys.readouterr().err
        assert ("1 reference(s) of the baseline did not run" if name == "noref" else
                "the settings differ from the baseline's: warmup") in err


def test_cli_refuses_a_device_this_machine_lacks_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=r"benchmark.py: error: --device cuda: CUDA is not "
                                         r"available"):
        _cli().main(["--preset", "cpu-smoke", "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"benchmark.py: error: --device gpu: "):
        _cli().main(["--preset", "cpu-smoke", "--device", "gpu"])


def test_one_more_host_sync_in_twenty_is_a_regression():
    cmp = compare_results(_result(syncs=40), _result(syncs=41), tolerance=0.05)
    (row,) = _rows(cmp, subject="d2seg", metric="host syncs/step")
    assert row["status"] == "regression"


def test_latency_ratio_noise_adds_both_subjects_spreads():
    old, new = _result(), _result()
    for r in (old, new):
        c = r["cases"][0]
        c["d2seg"]["inference"]["latency_ms_all"] = [10.0, 11.0, 12.0]   # spread 0.1
        c["references"][0]["inference"]["latency_ms_all"] = [10.0, 12.0, 13.0]  # 0.2
        c["ratios"]["plain"]["latency_speedup"] = 1.0
    (row,) = _rows(compare_results(old, new), metric="latency speed-up")
    assert row["noise"] == pytest.approx(0.3)


def test_cpu_memory_ratio_is_approximate():
    old, new = _result(), _result()
    old["cases"][0]["ratios"]["plain"]["train_memory_ratio"] = 1.0
    new["cases"][0]["ratios"]["plain"]["train_memory_ratio"] = 1.5
    (row,) = _rows(compare_results(old, new), metric="train memory ratio")
    assert row["status"] == "approximate"

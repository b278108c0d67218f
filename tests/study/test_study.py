"""The study: grid and config files, a tiny end-to-end run with its report, resume, and the paper
preset's hub path with the hub replaced by local stand-ins."""

import json

import pytest

from hf_sam.study import StudyConfig, parse_method
from hf_sam.study.__main__ import main as study_main
from hf_sam.study.runner import is_done, run_dir

TINY = {"measure_examples": 64, "landscape_points": 5, "surface_points": 3, "workers": 1}


def test_methods_parse():
    assert parse_method("adamw").ascent_steps == 0
    assert parse_method("sam").ascent_steps == 1
    m = parse_method("projected-k5")
    assert (m.ascent_steps, m.ascent_rule, m.family) == (5, "projected", "projected")
    assert parse_method("mean-k3").descent == "mean" and parse_method("asam-k2").adaptive
    for bad in ("sgd", "normalized-k0", "projected-5"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_xsam_methods_parse():
    dynamic, fixed = parse_method("xsam-k3"), parse_method("xsam-fixed-k2")
    assert (dynamic.descent, dynamic.xsam_alpha, dynamic.family) == ("xsam", None, "xsam")
    assert (fixed.ascent_steps, fixed.xsam_alpha, fixed.family) == (2, 0.5, "xsam-fixed")
    lookbehind = parse_method("lookbehind-k2")
    assert (lookbehind.method, lookbehind.ascent_steps, lookbehind.family) == ("lookbehind", 2, "lookbehind")


def test_family_methods_parse_with_their_passes():
    cases = {
        # name: (k, family, passes per step, fields)
        "gsam-k3": (3, "gsam", 4.0, {"descent": "gsam"}),
        "wsam-k1": (1, "wsam", 2.0, {"descent": "wsam"}),
        "friendly-k2": (2, "friendly", 3.0, {"direction": "friendly"}),
        "looksam-n5-k3": (3, "looksam", 1.6, {"every_n_steps": 5, "reuse_alpha": 0.7}),
        "every-n4-k2": (2, "every-n", 1.5, {"every_n_steps": 4, "reuse_alpha": 0.0}),
        "msam": (1, "msam", 1.0, {"method": "msam"}),
        "late50-k1": (1, "late", 1.5, {"start_fraction": 0.5}),
        "late75-k2": (2, "late", 1.5, {"start_fraction": 0.75}),
        "sam": (1, "normalized", 2.0, {}),
        "adamw": (0, "adamw", 1.0, {}),
    }
    for name, (k, family, passes, fields) in cases.items():
        m = parse_method(name)
        assert (m.ascent_steps, m.family, m.passes_per_step) == (k, family, passes), name
        assert all(getattr(m, f) == v for f, v in fields.items()), name
    for bad in ("looksam-n1-k2", "looksam-k2", "msam-k2", "every-n3", "late0-k1", "late100-k1", "late50-k0"):
        with pytest.raises(ValueError):
            parse_method(bad)
    # equal compute: every method gets the passes of SAM k=1 (2 per step)
    config = StudyConfig.from_preset("family", tasks=["digits"], seeds=[0], budgets=["compute"])
    from hf_sam.study.grid import TASKS

    base = float(TASKS["digits"].training["num_train_epochs"])
    epochs = {r.method: r.epochs for r in config.runs()}
    assert epochs["msam"] == base * 2 and epochs["looksam-n5-k3"] == pytest.approx(base * 2 / 1.6)
    assert epochs["gsam-k3"] == base / 2 and epochs["sam"] == base


def test_pareto_front():
    import pandas as pd

    from hf_sam.study.tables import pareto_points

    rows = []
    for method, passes, accs in (
        ("cheap", 100, [0.80, 0.82]),  # the cheapest: on the front
        ("dominated", 150, [0.79, 0.81]),  # dearer and less accurate than "cheap"
        ("better", 200, [0.85, 0.87]),  # dearer and more accurate: on the front
        ("costly", 400, [0.84, 0.86]),  # dominated by "better"
    ):
        for seed, acc in enumerate(accs):
            rows.append({"task": "t", "budget": "epochs", "method": method, "family": "x", "seed": seed,
                         "eval_accuracy": acc, "forward_backward_passes": passes, "optimizer_steps": 50})  # fmt: skip
    # another budget's points are another front: a cheaper, more accurate run there dominates nothing here
    rows.append({"task": "t", "budget": "compute", "method": "cheap", "family": "x", "seed": 0,
                 "eval_accuracy": 0.99, "forward_backward_passes": 100, "optimizer_steps": 100})  # fmt: skip
    points = pareto_points(pd.DataFrame(rows))
    assert points[points["budget"] == "compute"]["on_front"].tolist() == [True]
    points = points[points["budget"] == "epochs"].set_index("method")
    assert points["on_front"].to_dict() == {"cheap": True, "dominated": False, "better": True, "costly": False}
    # mean 0.81 of (0.80, 0.82): sd 0.01414, t(0.975, 1) = 12.706 -> half width 0.127
    assert points.loc["cheap", "accuracy"] == pytest.approx(0.81)
    assert points.loc["cheap", "high"] - points.loc["cheap", "accuracy"] == pytest.approx(12.7062 * 0.01, rel=1e-4)


def test_paired_interval_matches_scipy_and_gives_the_verdict():
    from scipy import stats

    from hf_sam.study.verdicts import paired_interval, verdict, verdict_table

    a, b = [0.91, 0.89, 0.93, 0.90], [0.89, 0.88, 0.90, 0.88]
    mean, low, high = paired_interval([x - y for x, y in zip(a, b, strict=True)])
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert mean == pytest.approx(0.02) and verdict(low, high) == "better"
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 2.484138
    assert paired_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2.0 - 2.484138, 2.0 + 2.484138), rel=1e-6)
    assert verdict(-0.5, 4.5) == "no difference shown" and verdict(-2.0, -0.1) == "worse"
    rows = [
        {"task": "t", "budget": "epochs", "method": m, "rho": 0.05, "seed": s, "eval_accuracy": acc}
        for m, accs in {"sam": [0.8, 0.7, 0.9], "adamw": [0.7, 0.6, 0.8], "xsam-k2": [0.9, 0.6]}.items()
        for s, acc in enumerate(accs)
    ]
    table = verdict_table(__import__("pandas").DataFrame(rows)).set_index("method")
    assert table.loc["adamw", "verdict"] == "worse" and table.loc["adamw", "pairs"] == 3  # -0.1 every seed
    assert table.loc["xsam-k2", "pairs"] == 2 and table.loc["xsam-k2", "difference"] == pytest.approx(-0.0)


def test_grid_dedupes_and_scales_compute():
    config = StudyConfig.from_preset(
        "quick",
        tasks=["digits"],
        methods=["adamw", "sam", "normalized-k3"],
        seeds=[0],
        rhos=[0.05, 0.1],
        budgets=["epochs", "compute"],
    )
    runs = config.runs()
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    from hf_sam.study.grid import TASKS

    base = float(TASKS["digits"].training["num_train_epochs"])
    # adamw: rho-independent, 2 budgets; sam: 2 rhos, one run for both budgets; k3: 2 rhos x 2 budgets
    assert len(runs) == 2 + 2 + 4
    k3 = sorted(r.epochs for r in runs if r.method == "normalized-k3" and r.rho == 0.05)
    assert k3 == [base / 2, base]
    sam = [r for r in runs if r.method == "sam" and r.rho == 0.05]
    assert len(sam) == 1 and sam[0].in_budget("epochs") and sam[0].in_budget("compute")


def test_config_file_and_errors(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("preset: quick\ntasks: [digits]\nmethods: [adamw, sam]\nseeds: [3]\n")
    config = StudyConfig.from_file(path)
    assert config.tasks == ["digits"] and config.seeds == [3] and config.budgets == ["epochs", "compute"]
    path.write_text("tasks: [digits]\nwhatever: 1\n")
    with pytest.raises(ValueError, match="whatever"):
        StudyConfig.from_file(path)
    with pytest.raises(ValueError, match="Unknown task"):
        StudyConfig.from_preset("quick", tasks=["nope"])
    assert study_main(["--tasks", "nope", "--output_dir", str(tmp_path)]) == 2


def test_tiny_study_end_to_end_with_resume(tmp_path, monkeypatch):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(
        json.dumps(
            {
                "preset": "quick",
                "tasks": ["digits"],
                "methods": ["adamw", "sam", "normalized-k2", "xsam-k2", "lookbehind-k2", "looksam-n2-k2", "msam"],
                "seeds": [0, 1],
                "budgets": ["epochs", "compute"],
                "training_overrides": {"num_train_epochs": 0.3},
                **TINY,
            }
        )
    )
    out = tmp_path / "study"
    assert study_main(["--config", str(config_file), "--output_dir", str(out)]) == 0
    config = StudyConfig.from_file(config_file)
    runs = config.runs()
    assert all(is_done(out, r) for r in runs)
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(runs)
    for row in results:
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        steps, k = row["optimizer_steps"], row["ascent_steps"]
        if row["method"] == "msam":
            assert row["forward_backward_passes"] == steps
        elif row["method"] == "looksam-n2-k2":  # k + 1 passes on even steps, one on odd steps
            assert row["forward_backward_passes"] == (steps + 1) // 2 * 3 + steps // 2
        else:
            assert row["forward_backward_passes"] == steps * (k + 1)
        assert row["hessian_trace"] == row["hessian_trace"]  # not NaN
        if row["ascent_steps"] >= 1 and row["method"] in ("sam", "normalized-k2", "xsam-k2"):  # with diagnostics
            assert row["train_sam_ascent_loss_1"] >= row["train_sam_ascent_loss_0"] - 1e-6
    report = (out / "report.md").read_text()
    for figure in ("accuracy_vs_k", "sharpness_vs_k", "ascent_losses", "landscapes", "accuracy_vs_compute"):
        assert f"figures/{figure}.png" in report and (out / "figures" / f"{figure}.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert {row["budget"] for row in summary} == {"epochs", "compute"}
    assert "## Verdicts against SAM k=1" in report and "`xsam-k2`" in report
    assert "## Landscape verdicts against SAM k=1" in report and "λ_max ratio [95%]" in report
    header = (out / "verdicts.csv").read_text().splitlines()[0].split(",")
    assert {"hessian_top_eigenvalue_verdict", "m_sharpness_ratio", "train_sam_sharpness_low"} <= set(header)
    xsam = [row for row in results if row["method"] == "xsam-k2"]
    assert xsam and all(0.0 <= row["train_sam_xsam_alpha"] <= 2.0 for row in xsam)
    assert "`lookbehind-k2`" in report and "`msam`" in report and "`looksam-n2-k2`" in report
    assert "- **digits**, epochs: `" in report and (out / "pareto.csv").exists()
    surfaces = [r for r in runs if "surface" in __import__("numpy").load(run_dir(out, r) / "landscape.npz")]
    assert {r.method for r in surfaces} == {"sam", "normalized-k2"}

    # resume: a finished grid runs nothing again; an interrupted run is redone
    victim = runs[0]
    (run_dir(out, victim) / "metrics.json").unlink()
    executed = []
    import hf_sam.study.runner as runner

    real = runner.execute

    def counting(config, run, root, surface=False):
        executed.append(run.run_id)
        return real(config, run, root, surface)

    monkeypatch.setattr(runner, "execute", counting)
    assert study_main(["--config", str(config_file), "--output_dir", str(out)]) == 0
    assert executed == [victim.run_id]


def test_paper_preset_hub_path_with_local_stand_ins(tmp_path, monkeypatch):
    """The paper preset loads CIFAR-10 and SST-2 and their models through the hub loaders; here the
    hub answers with small local stand-ins of the same shape."""
    import transformers

    from hf_sam.tasks import hub

    from ..tasks.test_tasks import _hub_like

    asked = []

    def fake_from_hub(what, offline_choice, load, *args, **kwargs):
        name = args[0]
        asked.append(name)
        if load.__name__ == "load_dataset":
            return _hub_like(name, args[1] if len(args) > 1 else None)
        owner = getattr(load, "__self__", None)
        if owner is transformers.AutoImageProcessor:
            return transformers.ViTImageProcessor(size={"height": 16, "width": 16})
        if owner is transformers.AutoModelForImageClassification:
            config = transformers.ViTConfig(
                image_size=16,
                patch_size=8,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                **{k: kwargs[k] for k in ("num_labels", "id2label", "label2id")},
            )
            return transformers.ViTForImageClassification(config)
        if owner is transformers.AutoTokenizer:
            from hf_sam.tasks.text import resolve_model_path

            return transformers.AutoTokenizer.from_pretrained(resolve_model_path("embedded:minilm"))
        if owner is transformers.AutoModelForSequenceClassification:
            config = transformers.BertConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                **{k: kwargs[k] for k in ("num_labels", "id2label", "label2id")},
            )
            return transformers.BertForSequenceClassification(config)
        raise AssertionError(f"unexpected hub load {load} {name}")

    monkeypatch.setattr(hub, "from_hub", fake_from_hub)
    monkeypatch.setattr("hf_sam.tasks.data.from_hub", fake_from_hub)
    monkeypatch.setattr("hf_sam.tasks.models.from_hub", fake_from_hub)
    config_file = tmp_path / "paper.yaml"
    config_file.write_text(
        "preset: paper\ntasks: [cifar10, sst2]\nmethods: [adamw, sam]\nseeds: [0]\n"
        "rhos: [0.05]\nbudgets: [epochs]\nworkers: 1\nmeasure_examples: 16\n"
        "landscape_points: 3\nsurface_points: 3\ntraining_overrides: {max_steps: 2}\n"
    )
    out = tmp_path / "paper"
    assert study_main(["--config", str(config_file), "--output_dir", str(out)]) == 0
    assert {"cifar10", "google/vit-base-patch16-224-in21k", "glue", "bert-base-uncased"} <= set(asked)
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["task"], r["method"]) for r in results) == [
        ("cifar10", "adamw"),
        ("cifar10", "sam"),
        ("sst2", "adamw"),
        ("sst2", "sam"),
    ]


def test_sam_late_in_training_reaches_the_trainer_as_sam_start_step(tmp_path):
    from hf_sam.study.grid import RunSpec
    from hf_sam.study.runner import _training_args

    config = StudyConfig.from_preset("quick", tasks=["digits"], seeds=[0], methods=["late50-k2"])
    run = RunSpec("digits", "late50-k2", 0.05, 0, "epochs", 1.0, 1.0)
    args = _training_args(config, run, tmp_path, {})
    assert (args.sam_start_step, args.sam_ascent_steps) == (0.5, 2)
    assert args.sam_config.first_sam_step(10) == 5


def test_the_finetune_preset_fine_tunes_pretrained_models_on_few_examples():
    from hf_sam.study.grid import TASKS

    config = StudyConfig.from_preset("finetune")
    tasks = [TASKS[name] for name in config.tasks]
    assert {t.kind for t in tasks} == {"text", "image"}
    assert all(t.model.get("model_name_or_path", "").startswith("embedded:") for t in tasks), "pretrained, no hub"
    assert all(t.data["max_train_samples"] <= 1000 for t in tasks)
    assert any(t.model.get("use_peft") for t in tasks) and any(t.data.get("label_noise") for t in tasks)
    assert "late50-k1" in config.methods and set(config.budgets) == {"epochs", "compute"}

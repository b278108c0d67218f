"""The pages generated from the code still say what the code does."""

from pathlib import Path

from hf_sam.trainer.flag_table import BEGIN, END, flag_table, write_into

ROOT = Path(__file__).resolve().parents[1]


def test_the_flag_table_in_usage_md_is_the_generated_one():
    page = (ROOT / "docs" / "usage.md").read_text()
    assert BEGIN in page and END in page
    committed = page[page.index(BEGIN) : page.index(END) + len(END)]
    assert committed == flag_table(), "regenerate it: python -m hf_sam.trainer.flag_table"
    assert write_into(page) == page, "the metric table: regenerate it (python -m hf_sam.trainer.flag_table)"


def test_a_metric_no_one_declared_is_refused():
    import pytest

    from hf_sam.trainer.step_metrics import SAMStepMetrics, declared

    assert declared("sam/ascent_loss_3").per == "step" and declared("sam/grad_norm").ranks == "mean"
    with pytest.raises(KeyError, match="not declared"):
        SAMStepMetrics(diagnostics=False).add({"sam/made_up": 1.0}, global_step=0)


def test_the_flag_table_lists_every_sam_field_with_its_default():
    import dataclasses

    from hf_sam import SAMConfig

    table = flag_table()
    for f in dataclasses.fields(SAMConfig):
        default = "unset" if f.default is None else f"`{f.default}`" if isinstance(f.default, str) else str(f.default)
        assert f"| `--sam_{f.name}` | {default} |" in table, f.name


def test_the_readme_example_runs_as_it_is(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- runnable example -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README example", "exec"), {})
    printed = capsys.readouterr().out
    assert "sam/sharpness" in printed and (tmp_path / "out").is_dir()


def _architecture_example() -> str:
    page = (ROOT / "docs" / "architecture.md").read_text()
    return page.split("<!-- user variant example -->\n```python\n", 1)[1].split("```", 1)[0]


def test_the_user_variant_of_architecture_md_is_selected_validated_and_matches_float64(tmp_path):
    """The page's own descent, registered from a script of the user's: selected and given its options on a
    command line, refused where its declaration says, and its update equal to a float64 computation of
    (||g|| / ||g_s||)^p g_s written here from the definition."""
    from types import SimpleNamespace

    import pytest
    import torch
    from transformers import HfArgumentParser, set_seed

    from hf_sam import SAMTrainingArguments
    from hf_sam.engine import unregister
    from hf_sam.trainer.checks import check_launch

    from .helpers import WeightRecorder, sam_trainer
    from .reference_sam import NAMES, flatten, grad_at, perturbation
    from .tiny import TinyNet, batch_of, make_data

    exec(compile(_architecture_example(), "docs/architecture.md example", "exec"), {"__name__": "user_script"})
    try:
        argv = ["--output_dir", str(tmp_path), "--sam_ascent_steps", "2", "--sam_descent", "rescaled"]
        (args,) = HfArgumentParser(SAMTrainingArguments).parse_args_into_dataclasses(
            [*argv, "--sam_options", '{"rescaled_power": 0.5}']
        )
        assert args.sam_config.variant_options("descent").rescaled_power == 0.5
        from hf_sam.trainer.flag_table import variant_table

        row = next(r for r in variant_table(users=True) if r.startswith("| `--sam_descent rescaled` |"))
        assert "`--sam_options rescaled_power`" in row and "several processes without sam_sync_ascent" in row
        assert not any("rescaled" in r for r in variant_table())  # the committed page lists the built-in ones
        with pytest.raises(ValueError, match=r"sam_options\['rescaled_power'\]=3 is invalid: it must be in \[0, 2\]"):
            SAMTrainingArguments(output_dir=str(tmp_path), sam_descent="rescaled", sam_options={"rescaled_power": 3})
        with pytest.raises(ValueError, match=r"sam_options\['power'\]"):
            SAMTrainingArguments(output_dir=str(tmp_path), sam_descent="rescaled", sam_options={"power": 1})

        set_seed(0)
        model, data, recorder = TinyNet(), make_data(n=8), WeightRecorder()
        lr, rho, steps = 0.1, 0.3, 2
        trainer = sam_trainer(
            tmp_path, model, data, [recorder], max_steps=steps, learning_rate=lr, sam_ascent_steps=2, sam_rho=rho,
            sam_descent="rescaled", sam_options='{"rescaled_power": 0.5}',
        )  # fmt: skip
        trainer.train()
        after = recorder.before[1:] + [recorder.final]
        for step in range(steps):
            weights = recorder.before[step]
            shapes = {n: tuple(weights[n].shape) for n in NAMES}
            vec = flatten(weights)
            x, y = batch_of(data[4 * step : 4 * step + 4])
            g = grad_at(vec, shapes, x, y)
            g_s = grad_at(vec + perturbation(vec, shapes, x, y, 2, rho), shapes, x, y)
            want = vec - lr * (torch.linalg.norm(g) / torch.linalg.norm(g_s)) ** 0.5 * g_s
            assert (want - vec + lr * g_s).abs().max() > 1e-4, "the rescaling should change SAM's step"
            torch.testing.assert_close(flatten(after[step]), want, rtol=0, atol=1e-12)

        launch = SimpleNamespace(  # a stand-in two-process launch: the refusal its declaration names
            sam_config=trainer.sam_config,
            args=SimpleNamespace(gradient_accumulation_steps=1, n_gpu=1, fsdp=False, world_size=2),
            is_deepspeed_enabled=False,
            is_fsdp_enabled=False,
        )
        with pytest.raises(ValueError, match="sam_descent='rescaled' with several processes needs --sam_sync_ascent"):
            check_launch(launch)
    finally:
        unregister("descent", "rescaled")

"""The pages generated from the code still say what the code does."""

from pathlib import Path

from hf_sam.trainer.flag_table import BEGIN, END, flag_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_flag_table_in_usage_md_is_the_generated_one():
    page = (ROOT / "docs" / "usage.md").read_text()
    assert BEGIN in page and END in page
    committed = page[page.index(BEGIN) : page.index(END) + len(END)]
    assert committed == flag_table(), "regenerate it: python -m hf_sam.trainer.flag_table"


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

"""The docs: the benchmarks page is rendered from bench/results/*.json, and the README's links resolve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from bench.render import RESULTS_DIR, cell, flatten, render
from tests.helpers import REPO


def test_a_new_flat_results_file_renders_without_new_code(tmp_path):
    (tmp_path / "2031-01-02-trial-cost.json").write_text(
        json.dumps(
            {
                "date": "2031-01-02",
                "command": "python -m bench.trial_cost --trials 3",
                "machine": {"cpu": "Some CPU 9000", "cores": 2},
                "rows": [{"phase": "build", "seconds": 1.25}, {"phase": "fit", "seconds": 7.5, "epochs": 3}],
                "notes": "measured on a quiet machine",
            }
        )
    )
    page = render(tmp_path)
    assert "## 2031-01-02-trial-cost" in page
    assert "Command: `python -m bench.trial_cost --trials 3`" in page
    assert "Machine: cpu Some CPU 9000; cores 2" in page
    assert "| phase | seconds | epochs |" in page
    assert "| build | 1.25 | - |" in page and "| fit | 7.5 | 3 |" in page
    assert "measured on a quiet machine" in page


def test_every_figure_of_every_results_file_is_on_the_page():
    page = render()
    files = sorted(RESULTS_DIR.glob("*.json"))
    assert files
    for path in files:
        assert f"## {path.stem}" in page
        data = json.loads(path.read_text())
        for key, value in flatten(data).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "table":
                assert cell(value) in page, (path.name, key)


def test_the_committed_pages_hold_the_tables_the_renderer_makes_from_bench_results():
    """GitHub shows the Markdown as committed: the benchmarks and backbones pages (and the README) must
    hold what `python -m bench.render` renders from bench/results now."""
    from bench.render import markdown_blocks, rendered

    blocks = markdown_blocks()
    assert sorted(blocks) == ["README.md", "docs/backbones.md", "docs/benchmarks.md"]
    for name, file_blocks in blocks.items():
        path = REPO / name
        assert path.read_text() == rendered(path, file_blocks), f"{name} is stale: run python -m bench.render"
    benchmarks = (REPO / "docs" / "benchmarks.md").read_text()
    assert all(f"## {p.stem}" in benchmarks for p in RESULTS_DIR.glob("*.json"))
    backbones = (REPO / "docs" / "backbones.md").read_text()
    assert "| rank | backbone |" in backbones and "| backbone | image px |" in backbones
    # Links go to the results file's section of the benchmarks page: a file outside docs/ is not on the site.
    assert "-backbone-sweep.json`](benchmarks.md#" in backbones and "](bench/results/" not in backbones


def test_the_renderer_writes_a_page_and_names_a_missing_block(tmp_path, capsys, monkeypatch):
    from bench import render as bench_render

    results = tmp_path / "results"
    results.mkdir()
    (results / "2031-01-02-trial-cost.json").write_text(json.dumps({"date": "2031-01-02", "rows": [{"s": 1.5}]}))
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# B\n\n{bench_render.RESULTS_START}\nold\n{bench_render.RESULTS_END}\n\nrest\n")
    blocks = bench_render.markdown_blocks(results)["docs/benchmarks.md"]
    assert bench_render.fill(page, blocks) and not bench_render.fill(page, blocks)
    text = page.read_text()
    assert "## 2031-01-02-trial-cost" in text and "| 1.5 |" in text and "\nold\n" not in text
    assert text.endswith(f"{bench_render.RESULTS_END}\n\nrest\n")
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="has no <!-- bench results:start -->"):
        bench_render.fill(page, blocks)
    # `python -m bench.render` writes every page it knows, from the results dir it is given.
    for name in ("README.md", "docs/benchmarks.md", "docs/backbones.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((REPO / name).read_text())
    monkeypatch.setattr(bench_render, "REPO", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench.render", "--results-dir", str(results)])
    bench_render.main()
    out = capsys.readouterr().out
    assert "docs/benchmarks.md: updated" in out and "docs/backbones.md: updated" in out
    assert "No `python -m bench.backbone_sweep` results yet." in (tmp_path / "docs" / "backbones.md").read_text()


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#[^)]*)?\)", text)
    assert targets
    for target in targets:
        assert (REPO / target).exists(), target


def test_every_docs_page_is_in_the_site_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert f": {page.name}" in nav, page.name


def test_the_readmes_per_machine_and_backbone_sweep_tables_are_the_rendered_ones(tmp_path):
    from bench.render import (
        README_END,
        README_START,
        SWEEP_END,
        SWEEP_START,
        backbone_sweep_table,
        fill_readme,
        machines_table,
    )

    text = (REPO / "README.md").read_text()
    assert text.split(README_START)[1].split(README_END)[0] == "\n" + machines_table(link_files=True, per_class=True)
    sweep = text.split(SWEEP_START)[1].split(SWEEP_END)[0]
    assert sweep == "\n" + backbone_sweep_table() and "| convnext_tiny |" in sweep
    # A new full bench file becomes a row of its own: `python -m bench.render --readme README.md`.
    results = tmp_path / "results"
    results.mkdir()
    machine = {"cpu": "Some CPU 9000", "cpu_flags_of_note": ["avx2", "avx512f"], "load_average_start": [0.25]}
    report = {
        "date": "2031-01-02",
        "mode": "full",
        "machine": machine,
        "ratio": 9.5,
        # Judged against the targets in force (bench/targets.py), not the ones recorded when it ran.
        "targets": {"extraction_ratio": True},
        "ceiling": {"img_per_s": 48.8, "fraction": 0.9},
        "end_to_end": {"img_per_s": 40.0},
        "head_epoch": {"seconds": 2.0},
        "runs": {"cold": {"returncode": 0, "wall_s": 2000.0, "peak_rss_gb": 1.0}},
    }
    (results / "2031-01-02.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\nrest\n")
    with pytest.raises(SystemExit, match="has no <!-- bench backbone-sweep:start -->"):
        fill_readme(readme, results)
    blocks = f"{SWEEP_START}{SWEEP_END}"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\n{blocks}\nrest\n")
    assert fill_readme(readme, results) and not fill_readme(readme, results)
    (row,) = [line for line in readme.read_text().splitlines() if line.startswith("| [`2031-01-02`]")]
    assert "(bench/results/2031-01-02.json)" in row and "| Some CPU 9000 (AVX512) | full | 0.2 |" in row
    assert "| 9.5 |" in row and row.endswith("| 0.82 | 2000 | 1883 | - | 2 | 3 of 4; not: cold_run_s |")
    assert "No `python -m bench.backbone_sweep` results yet." in readme.read_text()
    # One README row per machine class, its newest full run; the benchmarks page keeps every file.
    for name, mode in (("2031-01-03", "quick"), ("2031-01-01", "full")):
        (results / f"{name}.json").write_text(json.dumps({**report, "date": name, "mode": mode}))
    other = {**report, "machine": {**machine, "cpu_flags_of_note": ["avx2"]}, "date": "2031-01-01", "mode": "quick"}
    (results / "2031-01-01-other.json").write_text(json.dumps(other))
    fill_readme(readme, results)
    rows = [line.split("`")[1] for line in readme.read_text().splitlines() if line.startswith("| [`")]
    assert rows == ["2031-01-01-other", "2031-01-02"]
    assert machines_table(results).count("| [`") == 4
    assert readme.read_text().endswith(f"{SWEEP_END}\nrest\n") and "\nold\n" not in readme.read_text()


NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()


def test_the_docs_name_every_shipped_backbone_config_and_count_them_right():
    shipped = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
    assert "resnet50" in shipped and "resnet18" in shipped
    readme = (REPO / "README.md").read_text()
    assert f"{NUMBER_WORDS[len(shipped)]} ship as configs" in readme
    # docs/backbones.md: the table of shipped configs, a row each.
    page = (REPO / "docs" / "backbones.md").read_text()
    table = page.split("| config | why |")[1].split("\n\n")[0]
    assert sorted(re.findall(r"^\| `(\w+)` \|", table, flags=re.M)) == shipped
    # The configuration tables (README and docs/configuration.md): the model group's options.
    for text in (readme, (REPO / "docs" / "configuration.md").read_text()):
        (row,) = [line for line in text.splitlines() if line.startswith("| `model` |")]
        options = row.split("; or any torchvision classifier")[0]
        assert sorted(re.findall(r"`(\w+)`", options)[1:]) == shipped, options


# A page loads nothing from another host: a tag that fetches (a stylesheet, a font preconnect, a script,
# an image) or a stylesheet's url(). Links a reader may follow (<a href>) are fine.
EXTERNAL_LOAD = re.compile(r"<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=[\"']?(?:https?:)?//[^\"' >]+")
EXTERNAL_CSS = re.compile(r"(?:url\(|@import)\s*[\"']?(?:https?:)?//[^\"')]+")


def test_the_docs_theme_uses_system_fonts():
    import yaml

    theme = yaml.safe_load((REPO / "mkdocs.yml").read_text())["theme"]
    assert theme["name"] == "material" and theme["font"] is False  # no Google Fonts


@pytest.mark.slow
def test_the_built_site_loads_nothing_from_another_host(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(site)],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    pages = list(site.rglob("*.html"))
    assert len(pages) > 10
    for path in pages + list(site.rglob("*.css")):
        text = path.read_text(errors="replace")
        found = EXTERNAL_LOAD.findall(text) + (EXTERNAL_CSS.findall(text) if path.suffix == ".css" else [])
        assert not found, (path.relative_to(site), found[:3])
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, path


def test_the_benchmarks_page_states_the_targets_bench_judges():
    from bench.targets import CEILING_SHARE, IMAGES, TARGETS

    page = (REPO / "docs" / "benchmarks.md").read_text().split("<!-- bench results:start -->")[0]
    share = f"{CEILING_SHARE:.0%}"
    assert f"extraction **end to end >= {share} of the machine's own ceiling**" in page
    assert f"{IMAGES:,} / ({CEILING_SHARE} x the ceiling's img/s) + {TARGETS['warm_run_s']:.0f} s" in page
    assert f"head epoch < {TARGETS['head_epoch_s']:.0f} s" in page and f"< {TARGETS['peak_rss_gb']:.0f} GB" in page
    for dropped in ("9x the tutorial", "60% of the ceiling", "15 min"):
        assert dropped not in page


def test_every_figure_in_the_docs_is_shown_and_made_by_the_command_beside_it():
    from bench.docs_figures import FIGURES

    pages = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
    shown = {name for text in pages.values() for name in re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)}
    assert shown == {p.name for p in (REPO / "docs").glob("*.png")}, "a figure in docs/ no page shows, or one missing"
    for figure in FIGURES.values():
        page = (REPO / figure.page).read_text()
        name = figure.target.rsplit("/", 1)[-1]
        assert (REPO / figure.target).is_file() and f"]({name})" in page
        # The command in the code block right before the figure, word for word.
        before = page.split(f"]({name})")[0]
        assert before.rsplit("```bash\n", 1)[1].split("\n```")[0] == figure.command
        assert "python -m bench.docs_figures" in before.rsplit("```", 1)[1]

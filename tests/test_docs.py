"""The README and docs/ stay navigable: every link resolves, every line link lands on its code, the README is short
and its test command is the one CI runs."""

import re
from pathlib import Path

import check_doc_links

REPO = Path(__file__).resolve().parents[1]


def test_every_link_resolves_and_every_line_link_lands_on_its_code():
    assert check_doc_links.check() == []


def test_the_checker_finds_a_line_link_that_no_longer_points_at_its_code(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "script.py").write_text("import os\n\n\ndef the_function():\n    pass\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[`def the_function`](../script.py#L1) and [gone](../missing.py)\n")
    monkeypatch.setattr(check_doc_links, "pages", lambda: [page])
    problems = check_doc_links.check()
    assert len(problems) == 2 and "found on [4]" in problems[0] and "missing.py does not exist" in problems[1]
    check_doc_links.check(fix=True)
    assert "(../script.py#L4)" in page.read_text()


def test_the_readme_is_a_short_front_door_with_ci_s_test_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme
    for page in re.findall(r"\(docs/([a-z_]+\.md)\)", readme):
        assert (REPO / "docs" / page).exists(), page
    method_pages = {
        "vanilla_gan.md",
        "wgan.md",
        "dcgan.md",
        "unrolled_mdgan.md",
        "otgan.md",
        "cyclegan.md",
        "post_hoc.md",
    }
    for page in method_pages:
        text = (REPO / "docs" / page).read_text()
        sections = re.findall(r"^## (.+)$", text, flags=re.M)
        assert sections[0].startswith("The method") and sections[1] == "Usage", page
        assert "Implementation details" in sections, page
        assert "Results" in sections and "Notes" in sections, page


def test_the_results_index_is_fresh_and_every_kept_run_has_a_script_a_headline_and_a_citing_page():
    import csv

    import index_results

    lines = index_results.run_lines()
    with open(REPO / "results" / "index.csv") as f:
        committed = list(csv.DictReader(f))
    assert [dict(line, seed=str(line["seed"])) for line in lines] == committed  # python benchmark/index_results.py
    assert len(lines) > 50 and all(line["headline"] and line["script"] for line in lines)
    uncited = [line["run"] for line in lines if not line["cited_by"]]
    assert not uncited, uncited  # a kept run that no page cites belongs in git history, not in results/

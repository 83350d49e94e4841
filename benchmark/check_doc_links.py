"""Checks the links of README.md and docs/*.md: every relative target exists, and every line link
[`code`](../script.py#L123) lands on a line that holds `code`. With --fix, a line link whose code moved to another
(single) line is rewritten to point there, so the pages follow the scripts when they change.
Run: python benchmark/check_doc_links.py [--fix]   (the test suite runs it without --fix)
"""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def pages() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def check(fix: bool = False) -> list:
    """Problems as 'page: message' lines; with fix, line links are moved to where their code now is."""
    problems = []
    for page in pages():
        text = page.read_text()

        def resolve(match):
            label, target = match.group(1), match.group(2)
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                return match.group(0)  # a URL or an anchor in the same page
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve()
            if not file.exists():
                problems.append(f"{page.name}: {target} does not exist")
                return match.group(0)
            line_link = re.fullmatch(r"L(\d+)", anchor)
            code = re.fullmatch(r"`([^`]+)`", label)
            if not line_link:
                return match.group(0)
            if not code:
                problems.append(f"{page.name}: the line link {target} needs its code as the label, [`code`](...)")
                return match.group(0)
            lines = file.read_text().splitlines()
            number, snippet = int(line_link.group(1)), code.group(1)
            if 1 <= number <= len(lines) and snippet in lines[number - 1]:
                return match.group(0)
            found = [i + 1 for i, line in enumerate(lines) if snippet in line]
            if fix and len(found) == 1:
                return f"[{label}]({path}#L{found[0]})"
            problems.append(f"{page.name}: `{snippet}` is not on line {number} of {path} (found on {found or 'none'})")
            return match.group(0)

        fixed = LINK.sub(resolve, text)
        if fix and fixed != text:
            page.write_text(fixed)
    return problems


if __name__ == "__main__":
    problems = check(fix="--fix" in sys.argv[1:])
    print("\n".join(problems) or "every link resolves")
    sys.exit(1 if problems else 0)

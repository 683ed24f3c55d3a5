"""The user documentation stays short, linked and true to the typed config.

Fast and model-free: reads README.md and docs/*.md, and walks the dataclasses of
flywheel/config.py.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import pytest

from flywheel.config import RUN_FILE_KEYS, FlywheelConfig, RunFile

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
MAX_README_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional title follows).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
# [text]: target (reference-style definitions)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that point into the repository: no URLs, no
    pure #anchors, and nothing inside code blocks or code spans."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_README_LINES}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    broken = []
    for target in relative_links(path):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_the_link_checker_sees_links():
    # Guards the regexes: the README links to the docs pages.
    assert "docs/configuration.md" in relative_links(README)


# -- docs/configuration.md against flywheel/config.py ------------------------------------


def config_keys() -> dict[str, object]:
    """Every key of a config file, dotted (`train.beta`), with its dataclass default
    (MISSING for a required key; a default factory's value). Sections are the fields of
    FlywheelConfig whose type is a dataclass (`judge` included); a dataclass deeper down
    (`eval.judge`) is one key, since it is given as a spec or a mapping."""
    keys: dict[str, object] = {}
    hints = get_type_hints(FlywheelConfig)
    documented_sections = set()
    for field in fields(FlywheelConfig):
        section = hints[field.name]
        if section in documented_sections:
            continue  # `heldout_prompts` takes the keys of `prompts`, documented once
        if is_dataclass(section):
            documented_sections.add(section)
            for inner in fields(section):
                default = inner.default
                if default is MISSING and inner.default_factory is not MISSING:
                    default = inner.default_factory()
                keys[f"{field.name}.{inner.name}"] = default
        else:
            keys[field.name] = field.default
    run_file = {field.name: field.default for field in fields(RunFile)}
    for key in RUN_FILE_KEYS:  # the file's own top-level keys (`rounds`)
        keys[key] = run_file.get(key, MISSING)
    return keys


def documented_rows() -> dict[str, str]:
    """The rows of configuration.md's key tables (header `| key | default | ... |`):
    the dotted key of the first cell -> the default cell, code marks stripped."""
    rows: dict[str, str] = {}
    in_key_table = False
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:2] == ["key", "default"]:
            in_key_table = True
            continue
        match = re.fullmatch(r"`([a-z_][a-z0-9_.]*)`", cells[0])
        if in_key_table and match is not None and len(cells) >= 3:
            assert match[1] not in rows, f"{match[1]} has two rows in {CONFIGURATION.name}"
            rows[match[1]] = cells[1].strip("`")
    return rows


def test_configuration_names_every_config_key():
    missing = sorted(set(config_keys()) - set(documented_rows()))
    assert not missing, f"docs/configuration.md has no row for: {', '.join(missing)}"


def section_names() -> set[str]:
    hints = get_type_hints(FlywheelConfig)
    return {field.name for field in fields(FlywheelConfig) if is_dataclass(hints[field.name])}


def test_configuration_names_no_key_the_config_lacks():
    # A section may have a row of its own (`judge: SPEC` is short for the judge section).
    unknown = sorted(set(documented_rows()) - set(config_keys()) - section_names())
    assert not unknown, f"docs/configuration.md documents keys the config does not have: {', '.join(unknown)}"


def test_configuration_defaults_match_the_dataclasses():
    rows = documented_rows()
    wrong = []
    for key, default in config_keys().items():
        cell = rows.get(key)
        if cell is None:
            continue  # reported by test_configuration_names_every_config_key
        if default is MISSING:
            continue  # required: no default to compare
        if isinstance(default, dict):
            ok = cell == "{}" if not default else True
        elif default is None:
            ok = cell == "null"
        elif isinstance(default, bool):
            ok = cell == ("true" if default else "false")
        elif isinstance(default, (int, float)):
            try:
                ok = float(cell) == float(default) and (isinstance(default, float) or cell.lstrip("-").isdigit())
            except ValueError:
                ok = False
        elif isinstance(default, str):
            ok = cell == default
        else:
            continue
        if not ok:
            wrong.append(f"{key}: documented {cell!r}, default {default!r}")
    assert not wrong, "docs/configuration.md defaults differ from flywheel/config.py: " + "; ".join(wrong)


def test_required_keys_are_marked_required():
    rows = documented_rows()
    required = [f.name for f in fields(FlywheelConfig) if f.default is MISSING and f.default_factory is MISSING]
    required += [f"judge.{f.name}" for f in fields(get_type_hints(FlywheelConfig)["judge"])
                 if f.default is MISSING and f.default_factory is MISSING]
    not_marked = [key for key in required if rows.get(key) != "required"]
    assert not not_marked, f"required keys not marked 'required': {', '.join(not_marked)}"

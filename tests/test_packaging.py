"""Packaging: every command the README and the docs pages show is covered by the extra it names (checked from
the installed package's metadata, installing nothing), a missing extra is one line naming it, and the license /
typing metadata is what a wheel user sees."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shlex
import sys
from pathlib import Path

import pytest

from sb3_hanq.common.extras import MissingExtraError, missing_modules, require_extra

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The README is the front page; the commands and examples it links to live in docs/ (not in an sdist without it).
PAGES = [README] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)

#: Module -> distribution, for modules this test environment may lack (packages_distributions() covers the rest).
KNOWN_DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "rl_zoo3": "rl-zoo3",
    "optuna": "optuna",
    "tensorboard": "tensorboard",
    "pandas": "pandas",
    "requests": "requests",
    "tqdm": "tqdm",
    "rich": "rich",
    "torch": "torch",
    "numpy": "numpy",
    "gymnasium": "gymnasium",
    "stable_baselines3": "stable-baselines3",
    "sb3_contrib": "sb3-contrib",
    "minari": "minari",
    "sphinx": "sphinx",
    "myst_parser": "myst-parser",
}

#: What each part of an ``sb3-hanq-zoo`` command imports, from rl-zoo3's sources (independent of sb3_hanq.zoo):
#: the CLI reads YAML and runs rl-zoo3 with Optuna samplers; enjoy imports requests (Hugging Face helpers),
#: ``-tb`` makes SB3 open a TensorBoard writer, and ``-optimize`` writes its report with pandas.
ZOO_BASE_MODULES = {"yaml", "rl_zoo3", "optuna"}
ZOO_FLAG_MODULES = {"-tb": {"tensorboard"}, "-optimize": {"pandas"}, "enjoy": {"requests"}}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> dict[str | None, set[str]]:
    """Distribution names required by sb3-hanq, by extra (``None``: the base install)."""
    requires = md.requires("sb3-hanq")
    assert requires, "sb3-hanq is not installed (pip install -e .)"
    by_extra: dict[str | None, set[str]] = {}
    for line in requires:
        name = _normalize(re.match(r"[A-Za-z0-9_.-]+", line).group(0))  # type: ignore[union-attr]
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
        by_extra.setdefault(extra.group(1) if extra else None, set()).add(name)
    return by_extra


def _distribution(module: str) -> str:
    dists = md.packages_distributions().get(module) or [KNOWN_DISTRIBUTIONS.get(module, module)]
    return _normalize(dists[0])


def _code_blocks(language: str, page: Path = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _page_extras(page: Path) -> set[str]:
    """Extras a page names for its examples, as ``extra `minari` ``."""
    return set(re.findall(r"extra `([a-z]+)`", page.read_text()))


def _python_imports(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    if "progress_bar=True" in code:  # SB3 draws its progress bar with tqdm.rich
        modules.update({"tqdm", "rich"})
    return modules - {"sb3_hanq"} - set(sys.stdlib_module_names)


def _zoo_commands() -> list[tuple[str, list[str]]]:
    """(extra named for it, argv) of every ``sb3-hanq-zoo`` / ``optuna`` command in the README and the docs.

    The extra is the one installed by the closest ``pip install ...[extra]`` line above the command, on its page.
    """
    commands = []
    for page in PAGES:
        extra = ""
        for block in _code_blocks("bash", page):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if match := re.search(r"pip install .*\[([a-z,]+)\]", line):
                    extra = match.group(1)
                if line.startswith(("sb3-hanq-zoo ", "optuna ")):
                    commands.append((extra, shlex.split(line.replace("$RANDOM", "1"))))
    return commands


def test_readme_python_examples_run_on_the_base_install():
    requirements = _requirements()
    assert _code_blocks("python"), "the README shows no Python example"
    all_needed: set[str] = set()
    n_blocks = 0
    for page in PAGES:
        # the base install, plus the extras the page names for its examples (``extra `minari` ``)
        covered = requirements[None].union(*(requirements.get(extra, set()) for extra in _page_extras(page)))
        for block in _code_blocks("python", page):
            n_blocks += 1
            needed = _python_imports(block)
            all_needed |= needed
            uncovered = {module for module in needed if _distribution(module) not in covered}
            name = page.relative_to(ROOT)
            assert not uncovered, f"{name}: a Python example imports {sorted(uncovered)}, not in the base dependencies"
    assert n_blocks >= 4
    assert {"stable_baselines3", "tqdm", "rich"} <= all_needed  # the parser sees what the examples use


def test_readme_zoo_commands_are_covered_by_the_extra_they_name():
    requirements = _requirements()
    commands = _zoo_commands()
    assert any("-tb" in argv for _, argv in commands) and any("-optimize" in argv for _, argv in commands)
    for extra, argv in commands:
        assert extra in requirements, f"{shlex.join(argv)}: the README names no installed extra ({extra!r})"
        needed = set(ZOO_BASE_MODULES) if argv[0] == "sb3-hanq-zoo" else {"optuna"}
        for flag, modules in ZOO_FLAG_MODULES.items():
            if flag in argv:
                needed |= modules
        if argv[0] == "sb3-hanq-zoo":
            from sb3_hanq.zoo import zoo_modules

            needed |= set(zoo_modules(argv[1], argv[2:]))  # what the CLI itself checks for, too
        uncovered = {m for m in needed if _distribution(m) not in requirements[extra] | requirements[None]}
        assert not uncovered, f"{shlex.join(argv)} needs {sorted(uncovered)}, not in the '{extra}' extra"


def test_zoo_cli_without_its_extra_is_one_line(monkeypatch, capsys):
    from sb3_hanq import zoo

    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["train", "--algo", "hanq", "--env", "CartPole-v1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "'zoo' extra" in err and "yaml" in err and 'pip install "sb3-hanq[zoo]"' in err


def test_zoo_modules_follow_the_flags():
    from sb3_hanq.zoo import zoo_modules

    assert "tensorboard" not in zoo_modules("train", ["--algo", "hanq"])
    assert "tensorboard" in zoo_modules("train", ["-tb", "runs/"])
    assert "pandas" in zoo_modules("train", ["-optimize"])
    assert "requests" in zoo_modules("enjoy", [])
    with pytest.raises(ValueError, match="command"):
        zoo_modules("play", [])


def test_require_extra():
    require_extra("zoo", ["json"], "x")  # present: nothing happens
    with pytest.raises(MissingExtraError, match=r"^thing needs the 'minari' extra \(missing: no_such_mod_xyz\)"):
        require_extra("minari", ["json", "no_such_mod_xyz"], "thing")
    assert missing_modules(["json", "no_such_mod_xyz"]) == ["no_such_mod_xyz"]
    with pytest.raises(TypeError, match="modules"):
        missing_modules("json")


def test_license_and_typing_metadata():
    meta = md.metadata("sb3-hanq")
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "sb3_hanq" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()  # shipped as package data
    citation = (ROOT / "CITATION.cff").read_text()
    for title in (
        "HANQ: Hypergradients, Asymmetry, and Normalization",
        "Scaling Off-Policy Reinforcement Learning with Batch and Weight Normalization",
        "Towards Characterizing Divergence in Deep Q-Learning",
        "A Self-Tuning Actor-Critic Algorithm",
    ):
        assert title in citation

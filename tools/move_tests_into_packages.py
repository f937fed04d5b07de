#!/usr/bin/env python3
"""Move the repository's test suite (test/) into the ROS packages, so `colcon test` runs each package's tests.

Run once by the lead, after every branch of the round is merged (seven others edit test/ meanwhile):

    python tools/move_tests_into_packages.py            # does it (git mv + path fixes), then prints a summary
    python tools/move_tests_into_packages.py --dry-run  # only says what it would do

* planner tests (they exercise igt_planner) -> src/igt_planner/test/, everything else -> src/igt_robot/test/
  (helpers such as stack_probe.py and peers/ stay with the tests that import them);
* test/conftest.py becomes igt_robot/pytest_fixtures.py (a module both packages' conftest.py import, since
  pytest shares no conftest across sibling folders), its repository path taken from igt_robot.paths;
* ``Path(__file__).resolve().parents[1]`` (the repository root from test/) becomes ``parents[3]`` in the
  moved files (src/<package>/test/);
* the Makefile's and .ci's ``pytest test`` become the two package folders; docs/README mentions of
  ``test/test_x.py`` get the new folder.

Idempotent: a file already moved is skipped; nothing is overwritten.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD = REPO / 'test'
PACKAGES = {'igt_robot': REPO / 'src' / 'igt_robot' / 'test', 'igt_planner': REPO / 'src' / 'igt_planner' / 'test'}
#: test modules that belong to igt_planner (by topic: the planner, its node, ablation coverage).
PLANNER_TESTS = ('test_planner.py', 'test_planner_node.py', 'test_ablation.py')
FIXTURES_MODULE = REPO / 'src' / 'igt_robot' / 'igt_robot' / 'pytest_fixtures.py'
CONFTEST = '''"""Tests of the {package} package: `colcon test --packages-select {package}`, or pytest on this folder.

The suite's fixtures and its isolation (a private ROS graph per run, nothing left behind) come from
igt_robot.pytest_fixtures, shared by both packages' test folders.
"""
from igt_robot.pytest_fixtures import *  # noqa: F401,F403
'''
ROOT_PATH = re.compile(r'(Path\(__file__\)\.resolve\(\)\.parents)\[1\]')
REFERENCE = re.compile(r'(?<![\w/])test/((?:test_\w+|stack_probe|conftest)\.py|peers/)')


def destination(path: pathlib.Path) -> pathlib.Path:
    """Where a file or folder of test/ goes."""
    package = 'igt_planner' if path.name in PLANNER_TESTS else 'igt_robot'
    return PACKAGES[package] / path.name


def run(cmd, dry):
    print(' '.join(str(c) for c in cmd))
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def rewrite(path: pathlib.Path, transform, dry) -> bool:
    text = path.read_text()
    new = transform(text)
    if new != text:
        print(f'edit {path.relative_to(REPO)}')
        if not dry:
            path.write_text(new)
        return True
    return False


def move_conftest(dry) -> None:
    source = OLD / 'conftest.py'
    if not source.exists():
        return
    run(['git', 'mv', source, FIXTURES_MODULE], dry)
    if dry:
        return
    rewrite(FIXTURES_MODULE, lambda t: t.replace(
        "REPO = pathlib.Path(__file__).resolve().parents[1]", "REPO = paths.repo_root()").replace(
        "from igt_robot import testing\n", "from igt_robot import paths, testing\n", 1).replace(
        '"""Test-suite wide isolation',
        '"""pytest fixtures of the suite (both packages\' conftest.py import them); test-suite wide isolation', 1), dry)
    for package, folder in PACKAGES.items():
        (folder / 'conftest.py').write_text(CONFTEST.format(package=package))
        run(['git', 'add', folder / 'conftest.py'], dry)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dry-run', action='store_true')
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not OLD.is_dir():
        print('nothing to move: test/ is gone already')
        return 0
    move_conftest(dry)
    moved = []
    for path in sorted(OLD.iterdir()):
        if path.name in ('__pycache__', 'conftest.py'):
            continue
        target = destination(path)
        if target.exists():
            print(f'skip {path.relative_to(REPO)}: {target.relative_to(REPO)} exists', file=sys.stderr)
            continue
        run(['git', 'mv', path, target], dry)
        moved.append(target)
    if not dry:
        for target in moved:
            for py in ([target] if target.is_file() else sorted(target.rglob('*.py'))):
                if py.suffix == '.py':
                    rewrite(py, lambda t: ROOT_PATH.sub(r'\1[3]', t), dry)
    folders = ' '.join(str(p.relative_to(REPO)) for p in PACKAGES.values())
    for name in ('Makefile', '.ci/run'):
        path = REPO / name
        if path.exists():
            rewrite(path, lambda t: re.sub(r'pytest test\b', f'pytest {folders}', t), dry)

    def new_reference(match):
        return str(destination(OLD / match.group(1).rstrip('/')).relative_to(REPO)) + (
            '/' if match.group(1).endswith('/') else '')
    for doc in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md')), *sorted((REPO / 'bench').glob('*.py'))]:
        rewrite(doc, lambda t: REFERENCE.sub(new_reference, t), dry)
    print(f'{"would move" if dry else "moved"} {len(moved)} entries; run: make test  and  make colcon-check')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""tools/ imports go one way (tools/__init__.py): a folder imports only folders before it, and no
function imports tools code inside its body to dodge a circle."""

import ast
import glob
import os

from tools import ROOT

ORDER = ['vendoring', 'data', 'paper', 'scoring', 'figures', 'drivers', 'checks']
ALSO = {'bench': {'paper', 'vendoring'}}


def tools_imports(path):
    """(folder imported, at module level?) for every `from tools.<folder>...` import of a file."""
    tree = ast.parse(open(path).read())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('tools.'):
            yield node.module.split('.')[1], id(node) in top_level


def test_each_folder_imports_only_the_folders_before_it():
    wrong = []
    for path in glob.glob(os.path.join(ROOT, 'tools', '*', '*.py')):
        folder = os.path.basename(os.path.dirname(path))
        allowed = ALSO.get(folder) or set(ORDER[:ORDER.index(folder)])
        for imported, top_level in tools_imports(path):
            if imported != folder and imported not in allowed:
                wrong.append(f'{os.path.relpath(path, ROOT)} imports tools.{imported}')
            if not top_level:
                wrong.append(f'{os.path.relpath(path, ROOT)} imports tools.{imported} inside a function')
    assert not wrong, wrong


def test_every_folder_of_tools_has_its_place_in_the_order():
    folders = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, 'tools', '*', '__init__.py'))}
    assert folders == set(ORDER) | set(ALSO)
    assert not [p for p in glob.glob(os.path.join(ROOT, 'tools', '*.py')) if not p.endswith('__init__.py')], 'no loose modules'

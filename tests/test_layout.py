"""The layout of public/: wings with one direction of imports (issue 16).

Every module under public/ is parsed (ast, nothing imported) and checked:
1. a wing imports only its own and lower wings (WINGS, low to high); the top-level modules
   (the faces model.py, ss_model.py, dataset.py, test.py and cli.py) sit above them all;
2. no import circle between modules;
3. imports sit at the top of a module; one inside a function is only of an optional heavy
   dependency (Ray, matplotlib, the report wing that draws with it) or of a user-edited file
   (public.model, public.ss_model, read at run time on purpose), with a comment saying why;
4. a name defined with one leading underscore is used only in its own module;
5. no `getattr(settings, 'NAME', default)`: validation guarantees every setting exists.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ROOT / 'public'
WINGS = ('core', 'data', 'models', 'train', 'compress', 'results', 'search', 'report')
TOP = len(WINGS)                                   # the rank of public/*.py
# Modules a function may import (prefixes), and why that is allowed.
LATE = {'ray': 'optional heavy dependency', 'matplotlib': 'optional heavy dependency',
        'public.report': 'draws with matplotlib',
        'public.model': 'user-edited file', 'public.ss_model': 'user-edited file'}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


MODULES = {_module_name(p): p for p in sorted(PUBLIC.rglob('*.py'))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _rank(module):
    parts = module.split('.')
    if len(parts) > 1 and parts[1] in WINGS and (
            len(parts) > 2 or (PUBLIC / parts[1]).is_dir()):
        return WINGS.index(parts[1])
    return TOP


def _imports(tree):
    """(module imported, node, inside a function?) of every import of public or another
    package; `from public.data import csv_format` imports public.data.csv_format."""
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in MODULES else child.module, child, nested))
            visit(child, inner)
    visit(tree, False)
    return found


def _late(module):
    return next((why for prefix, why in LATE.items()
                 if module == prefix or module.startswith(prefix + '.')), None)


def test_the_layout_is_parsed():
    assert {'public.core.atomic', 'public.search.dispatch', 'public.report.pages',
            'public.dataset', 'public.test'} <= set(MODULES)
    assert all((PUBLIC / wing / '__init__.py').is_file() for wing in WINGS)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_a_wing_imports_only_its_own_and_lower_wings(module):
    wrong = []
    for imported, node, nested in _imports(TREES[module]):
        if not imported.startswith('public.') or (nested and _late(imported)):
            continue
        if _rank(imported) > _rank(module):
            wrong.append(f"line {node.lineno}: {imported}")
    assert not wrong, f"{module} imports a higher wing: {wrong} (order: {', '.join(WINGS)}, then public/*.py)"


def test_no_import_circle():
    graph = {m: {i for i, _, nested in _imports(tree) if i in MODULES and i != m
                 and not (nested and _late(i) == 'user-edited file')}
             for m, tree in TREES.items()}
    done, path = set(), []

    def walk(module):
        if module in path:
            raise AssertionError('import circle: ' + ' -> '.join(path[path.index(module):]
                                                                 + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            walk(other)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        walk(module)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_inside_functions_are_only_the_allowed_ones_with_a_reason(module):
    lines = MODULES[module].read_text().splitlines()
    wrong = []
    for imported, node, nested in _imports(TREES[module]):
        if not nested:
            continue
        here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
        commented = '#' in here or above.startswith('#')
        if not _late(imported) or not commented:
            wrong.append(f"line {node.lineno}: {imported}"
                         + ('' if _late(imported) else ' (not an allowed late import)')
                         + ('' if commented else ' (no comment saying why)'))
    assert not wrong, f"{module}: imports inside functions: {wrong}"


def _private_definitions(tree):
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return {n for n in names if n.startswith('_') and not n.startswith('__')}


def test_private_names_stay_in_their_module():
    private = {m: _private_definitions(t) for m, t in TREES.items()}
    wrong = []
    for module, tree in TREES.items():
        aliases = {}                  # local name -> public module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                    node.module or '').startswith('public'):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in MODULES:
                        aliases[a.asname or a.name] = sub
                    elif a.name in private.get(node.module, ()):
                        wrong.append(f"{module} line {node.lineno}: {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and node.attr in private.get(aliases[node.value.id], ())):
                wrong.append(f"{module} line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not wrong, f"private names used outside their module: {wrong}"


def test_no_getattr_fallback_for_a_setting():
    wrong = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == 'getattr' and len(node.args) == 3
                    and 'settings' in ast.unparse(node.args[0])
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str) and node.args[1].value.isupper()):
                wrong.append(f"{module} line {node.lineno}: getattr(..., {node.args[1].value!r}, ...)")
    assert not wrong, f"settings are validated, read them directly: {wrong}"

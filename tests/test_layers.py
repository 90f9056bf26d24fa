"""The house's layout: one family registry, layers without a circle, models free of the command line."""
import ast
import re
from pathlib import Path

import timm

import timm_gradattn
from timm_gradattn.families import FAMILIES, MODEL_NAMES, RECIPES, family_of, get_family, paper_recipe

PACKAGE = Path(timm_gradattn.__file__).resolve().parent
REPO = PACKAGE.parent
# What the model files may import from the package: facts and each other.
MODELS_MAY_IMPORT = ('timm_gradattn.models', 'timm_gradattn.families', 'timm_gradattn.errors',
                     'timm_gradattn.data.info')
# Imports left inside functions, each for a reason: optional heavy packages and dataset readers, a torch version
# fallback, matplotlib for the plots.
LAZY_ALLOWED = ('matplotlib', 'timm_gradattn.plots', 'sklearn', 'torchvision.datasets', 'medmnist', 'datasets',
                'torch.fx', 'h5py', 'scipy', 'onnx', 'onnxruntime', 'transformers', 'pytorch_grad_cam',
                'resource')  # resource: Unix only (Windows has none)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports():
    """{module: [(imported module, at top level?)]} for every module of the package."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    found = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split('.')[:len(package.split('.')) - node.level + 1] if node.level else []
                target = '.'.join(base + ([node.module] if node.module else []))
                targets = [target] + [f'{target}.{alias.name}' for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges += [(target, id(node) in top) for target in targets]
        found[name] = edges
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    imports = _imports()
    graph = {name: {t for t, _ in edges if t in imports and t != name} for name, edges in imports.items()}
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in graph[node]:
            assert state.get(nxt) != 'open', 'import cycle: ' + ' -> '.join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'
    for name in graph:
        if name not in state:
            visit(name, [name])


def test_models_import_only_timm_torch_and_facts():
    for name, edges in _imports().items():
        if name.startswith('timm_gradattn.models'):
            inside = {t for t, _ in edges if t.startswith('timm_gradattn')}
            assert all(t.startswith(MODELS_MAY_IMPORT) for t in inside), (name, inside)
    registry = [t for t, _ in _imports()['timm_gradattn.families'] if t.startswith('timm_gradattn')]
    assert registry == [], 'the registry imports nothing else of the package'


def test_imports_are_at_the_top_except_optional_heavy_ones():
    for name, edges in _imports().items():
        lazy = {t for t, top in edges if not top}
        assert all(t.startswith(LAZY_ALLOWED) for t in lazy), (name, lazy)


def test_the_registry_is_what_timm_has_registered():
    registered = {name for name in timm.list_models() if timm.models.is_model_in_modules(
        name, [m for f in FAMILIES.values() for m in f.modules])}
    assert registered == set(MODEL_NAMES) and len(MODEL_NAMES) == len(set(MODEL_NAMES)) == 15
    for family in FAMILIES.values():
        for model in family.models:
            cfg = timm.models.get_pretrained_cfg(model)
            assert model.split('.')[0] in family.models and family_of(f'{model}.digits') is family
            assert timm.models.get_arch_pretrained_cfgs(model) and tuple(
                n.split('.', 1)[1] for n in timm.models.get_arch_pretrained_cfgs(model)) == family.tags
            assert family.paper.title in (cfg.paper_name or '') or family.key == 'gradattn', model
        assert family.paper_recipe in RECIPES and paper_recipe(family.models[0]) == family.paper_recipe
    assert get_family('attention_shortcuts') is get_family('Attention-Shortcuts') is FAMILIES['attention-shortcuts']
    assert paper_recipe('resnet18') == 'paper'


def test_each_model_name_is_typed_in_its_model_file_and_the_registry_only():
    sources = [p for p in PACKAGE.rglob('*.py')] + [REPO / 'train.py'] + list((REPO / 'benchmarks').glob('*.py'))
    sources = [p for p in sources if not p.name.startswith('paper_results')]  # the papers' published figures
    for model in MODEL_NAMES:
        typed_in = {p.relative_to(REPO).as_posix() for p in sources
                    if re.search(rf'(?<![\w.]){re.escape(model)}(?![\w])', p.read_text())}
        assert len(typed_in) <= 2 and 'timm_gradattn/families.py' in typed_in, (model, typed_in)


def test_application_modules_stay_short():
    for path in PACKAGE.rglob('*.py'):
        if 'models' not in path.parts:
            assert len(path.read_text().splitlines()) <= 500, path

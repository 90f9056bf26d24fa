"""The family registry: every fact about the zoo's three model families, typed once.

A family is one paper's designs: its registered models, the baseline it is compared with, its pretrained tags, its
training recipes, its datasets and the paper itself. The model files, recipes, pretrained configs, model cards,
benchmarks and tests all read this module; adding a model means adding its name here and writing its model file.

This module imports nothing else of the package, so that any layer (the models included) may read it.
"""
import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

__all__ = ['Paper', 'Family', 'FAMILIES', 'DEFAULT_MODEL', 'MODEL_NAMES', 'RECIPES', 'DEFAULT_RECIPE', 'family_key', 'get_family',
           'family_of', 'paper_recipe']


@dataclass(frozen=True)
class Paper:
    """A paper: its title, identifiers for timm's ``paper_ids`` (None where it has none), a one-line citation and
    the key of its BibTeX entry in ``hub_cards/citations.bib``."""
    title: str
    ids: Optional[str]
    citation: str
    bibtex_key: str


@dataclass(frozen=True)
class Family:
    """One paper's models.

    ``key`` is the family's name on every command line (hyphenated; the underscore form is an alias);
    ``module`` the timm module (file in ``timm_gradattn/models/``) that registers its models. ``models`` are the
    zoo's registered names, the paper's main designs first; ``baseline`` is what they are compared with (a timm
    model, or one of ``models``).
    ``datasets`` are the paper's datasets; every model gets a pretrained tag per dataset plus ``digits`` (``tags``,
    the default first). ``recipes`` maps recipe names to settings, the paper's own recipe first (see ``recipe settings`` in
    ``timm_gradattn.settings``: shared values, then ``per_dataset``, then ``per_model``).
    """
    key: str
    title: str
    paper: Paper
    models: Tuple[str, ...]
    baseline: str
    datasets: Tuple[str, ...]
    recipes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    modules: Tuple[str, ...] = ()
    length: str = ''  # the paper's training length, in words

    @property
    def tags(self) -> Tuple[str, ...]:
        return self.datasets + ('digits',)

    @property
    def paper_recipe(self) -> str:
        return next(iter(self.recipes))


# --- papers ---------------------------------------------------------------------------------------------------
GRADATTN_PAPER = Paper(
    title='GradAttn: Transformer-Based Modulation of Residual Approach for Classification and Representation '
          'Learning Problems',
    ids='arXiv:2603.26756',
    citation='Ghoshal & Buckchash, GradAttn, Applied Sciences 16(11):5252, 2026 (arXiv:2603.26756)',
    bibtex_key='ghoshal2026gradattn')
CNNTENTION_PAPER = Paper(
    title='CNNtention: Can CNNs do better with Attention?',
    ids='arXiv:2412.11657',
    citation='Kapila, Glattki & Rathi, CNNtention: Can CNNs do better with Attention?, arXiv:2412.11657, 2024',
    bibtex_key='kapila2024cnntention')
ATTENTION_SHORTCUTS_PAPER = Paper(
    title='Introducing attention shortcuts in convolutional neural networks',
    ids=None,  # Erroz & Galar, AIMS Press, 2025: no DOI or arXiv id known to the project; cards cite it in full
    citation='Erroz & Galar, Introducing attention shortcuts in convolutional neural networks, AIMS Press, 2025',
    bibtex_key='erroz2025attentionshortcuts')

# --- recipes ----------------------------------------------------------------------------------------------------
# Every value a recipe sets; a flag given on the command line or in a YAML config overrides it.
# Quick training: cosine decay, no early stopping. 12 epochs with label smoothing 0.1 were chosen on digits'
# validation split among recipes that end within 150 s on a 2-core CPU (benchmarks/results/default_job_search.md:
# mean val top-1 over seeds 1-3 99.50 %; 15 epochs without smoothing, 99.63 %, took 160 s or more there); then
# Adam at 5e-4 rather than 1e-3, again on validation alone (default_job_search_bf16.md: mean val top-1 over seeds
# 1-5 99.63 % against 99.41 %, tied with a one-epoch warm-up and ahead of it on validation loss).
DEFAULT_RECIPE = dict(
    opt='adam', lr=5e-4, weight_decay=1e-4, sched='cosine', epochs=12, min_lr=1e-6, warmup_epochs=0,
    decay_rate=0.1, patience_epochs=10, patience=0, smoothing=0.1, decay_norm_and_bias=False, seed=42)
# GradAttn paper, Table 1: Adam (coupled L2 weight decay), plain cross-entropy, ReduceLROnPlateau on validation
# accuracy (factor 0.2, patience 3, min lr 1e-7), early stopping on it (patience 7), <= 100 epochs. It trains any
# timm model (no per_model table).
_GRADATTN_PAPER_RECIPE = dict(
    opt='adam', lr=1e-3, weight_decay=1e-4, sched='plateau', epochs=100, min_lr=1e-7, warmup_epochs=0,
    decay_rate=0.2, patience_epochs=3, patience=7, smoothing=0.0, decay_norm_and_bias=True, seed=42)

# The other papers train on the official training set less a validation carve-out of 10 % (--protocol official
# --val-fraction 0.1): He et al.'s 45k / 5k CIFAR split, from which both papers' 64k-update budgets come.
# Selection is on that split, never on the test set, and results.json gives the last epoch's test figures too,
# the measure both papers report. A recipe with ``per_model`` is refused for a model outside it.
# timm's multistep milestone m is the first epoch (or update) at the lower rate, counted from 1; torch's
# MultiStepLR and the papers' "divided at m" train m epochs (updates) at the old rate, so milestones here are
# the papers' + 1.
_OFFICIAL_SPLIT = dict(protocol='official', val_fraction=0.1)
_NO_EXTRAS = dict(warmup_epochs=0, min_lr=0.0, smoothing=0.0, patience=0, patience_epochs=10, seed=42)
# CNNtention (arXiv 2412.11657) as the authors' code ran it (SEED_SYSTEMS.md A.6): 182 epochs of batch 128,
# x0.1 steps per epoch, coupled L2 on every parameter. The baseline's optimiser is SGD with classical momentum
# (timm's 'momentum'; timm's 'sgd' is Nesterov).
_CNNTENTION_SGD = dict(opt='momentum', momentum=0.9, lr=0.1, weight_decay=1e-4, decay_milestones=[92, 137])
_CNNTENTION_ADAM = dict(opt='adam', lr=5e-4, weight_decay=1e-3, decay_milestones=[92, 116])
_CNNTENTION = dict(
    _OFFICIAL_SPLIT, **_NO_EXTRAS, sched='multistep', decay_rate=0.1, epochs=182, batch_size=128,
    decay_norm_and_bias=True,
    per_dataset={
        # The authors' CIFAR-10 constants (nearly grey; not the per-channel statistics) with pad-4 crop + flip.
        'cifar10': dict(mean=[0.4918688, 0.4918598, 0.4918584], std=[0.2469712, 0.2469677, 0.2469720]),
        # Unnormalised; flipped 32 px crops of the 4-px-padded 28 px digits for training, 28 px for testing.
        'mnist': dict(mean=[0.0], std=[1.0], train_augment='cnntention_mnist'),
    })
# Attention Shortcuts (Erroz & Galar 2025, Sec. 4.2; He et al.'s CIFAR schedule): SGD 0.1, momentum 0.9, coupled
# L2 1e-4, batch 128, 64k updates divided by 10 at 32k and 48k. The schedule counts updates and stops at 64k,
# mid-epoch if need be; the epoch count follows from it. Normalised by the training set's per-channel statistics
# (the cifar100 tag already has them).
_ATTENTION_SHORTCUTS = dict(
    _OFFICIAL_SPLIT, **_NO_EXTRAS, opt='momentum', momentum=0.9, lr=0.1, weight_decay=1e-4,
    decay_norm_and_bias=True, batch_size=128, sched='multistep', sched_on_updates=True,
    decay_milestones=[32001, 48001], decay_rate=0.1, max_updates=64000, epochs=None,
    per_dataset={'cifar10': dict(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])})

# --- the families ---------------------------------------------------------------------------------------------
_GRADATTN_MODELS = ('gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope',
                    'resnet18_se', 'resnet18_cbam')
_CNNTENTION_MODELS = ('resnet20', 'resnet20_selfatt', 'resnet20_mha', 'resnet20_cbam')
_ATTENTION_SHORTCUTS_MODELS = ('asnet50_out', 'asnet50_kv', 'as_resnet50_stages', 'resnet50_cifar',
                               'resnet50_cifar_050', 'resnet50_cifar_plain')

FAMILIES: Dict[str, Family] = {family.key: family for family in (
    Family(
        key='gradattn', title='GradAttn', paper=GRADATTN_PAPER,
        # The three GradAttn variants, then the SE / CBAM ResNet-18 baselines trained under the same protocol.
        models=_GRADATTN_MODELS, baseline='resnet18',
        # The paper's eight datasets; the first is the default tag: create_model('gradattn_resnet18_rope') is Tiny
        # ImageNet's.
        datasets=('tiny_imagenet', 'cifar10', 'svhn', 'fashion_mnist', 'tissuemnist', 'bloodmnist', 'pcam',
                  'pad_ufes_20'),
        recipes={'paper': _GRADATTN_PAPER_RECIPE},
        modules=('gradattn', 'resnet_attn'), length='up to 100 epochs with early stopping'),
    Family(
        key='cnntention', title='CNNtention', paper=CNNTENTION_PAPER,
        models=_CNNTENTION_MODELS, baseline='resnet20',
        datasets=('cifar10', 'mnist'),
        recipes={
            # The authors' per-model recipe: SGD for the baseline, Adam for the attention models (their logged runs).
            'cnntention': dict(_CNNTENTION, per_model={
                'resnet20': _CNNTENTION_SGD,
                'resnet20_selfatt': _CNNTENTION_ADAM,
                'resnet20_mha': _CNNTENTION_ADAM,
                'resnet20_cbam': dict(opt='adam', lr=5e-3, weight_decay=1e-4, decay_milestones=[46, 92, 137]),
            }),
            # The baseline's SGD recipe for all four: a like-for-like comparison.
            'cnntention-sgd': dict(_CNNTENTION, **_CNNTENTION_SGD, per_model=dict.fromkeys(_CNNTENTION_MODELS, {})),
        },
        modules=('cnntention',), length='182 epochs'),
    Family(
        key='attention-shortcuts', title='Attention Shortcuts', paper=ATTENTION_SHORTCUTS_PAPER,
        models=_ATTENTION_SHORTCUTS_MODELS, baseline='resnet50_cifar',
        datasets=('cifar10', 'cifar100'),
        recipes={'attention-shortcuts': dict(
            _ATTENTION_SHORTCUTS, per_model=dict.fromkeys(_ATTENTION_SHORTCUTS_MODELS, {}))},
        modules=('attention_shortcuts',), length='64k updates (182 epochs of the 45k training images)'),
)}

# What `python train.py` trains with no arguments, and the model the documentation's examples use.
DEFAULT_MODEL = 'gradattn_resnet18_rope'

# Every registered model, family by family: ``timm_gradattn.MODEL_NAMES``.
MODEL_NAMES: Tuple[str, ...] = tuple(name for family in FAMILIES.values() for name in family.models)

# Every named recipe: 'default' and each family's.
RECIPES: Dict[str, Dict[str, Any]] = {
    'default': DEFAULT_RECIPE,
    **{name: recipe for family in FAMILIES.values() for name, recipe in family.recipes.items()},
}


def family_key(name: str) -> str:
    """The registry key for a family name as a user may type it: any case, underscores or hyphens."""
    return name.strip().lower().replace('_', '-')


def get_family(name: str) -> Family:
    """The family called ``name`` (``attention_shortcuts`` is ``attention-shortcuts``).

    Raises:
        KeyError: no such family; the message lists the keys.
    """
    key = family_key(name)
    if key not in FAMILIES:
        raise KeyError(f'Unknown model family {name!r}; the families are {", ".join(FAMILIES)}.')
    return FAMILIES[key]


def family_of(model_name: str) -> Optional[Family]:
    """The family of a registered model name (a pretrained tag after '.' is ignored); None for other timm models."""
    architecture = model_name.split('.', 1)[0]
    return next((family for family in FAMILIES.values() if architecture in family.models), None)


def paper_recipe(model_name: Optional[str]) -> str:
    """The recipe of the paper ``model_name`` comes from; GradAttn's 'paper' for any other timm model (or None)."""
    family = family_of(model_name) if model_name else None
    return (family or FAMILIES['gradattn']).paper_recipe


def recipe_copy(name: str) -> Dict[str, Any]:
    """A deep copy of recipe ``name`` (callers may change it freely)."""
    return copy.deepcopy(RECIPES[name])

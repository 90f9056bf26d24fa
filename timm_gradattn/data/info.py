"""Facts about every dataset the project knows: the single source of truth.

The pretrained configurations of the models (``timm_gradattn.models``) and the data pipeline
(``timm_gradattn.data``) both read these records, so a dataset's classes, input size and
normalisation are stated exactly once. Figures follow the GradAttn paper (arXiv:2603.26756,
section 4.2, Table 2) and its reference implementation.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from timm.data import ImageNetInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    name: str                           # the pretrained tag and the ``--dataset`` name
    title: str                          # how people write it
    num_classes: int
    input_size: Tuple[int, int, int]    # (channels, height, width) the model sees
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    label_names: Optional[Tuple[str, ...]]  # None where the names are read from the dataset files
    license: str                        # the dataset's licence, as the Hub spells it
    homepage: str
    split: Tuple[float, float, float] = (0.70, 0.15, 0.15)  # paper protocol: train / val / test
    batch_size: int = 128               # paper Table 1
    train_augment: str = 'none'         # a recipe name understood by timm_gradattn.data
    hf_dataset: Optional[str] = None    # Hub dataset id, for timm's ``hfds/`` reader
    citation: str = ''

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    @property
    def img_size(self) -> int:
        return self.input_size[-1]

    def head_label_names(self, num_classes: int) -> List[str]:
        """A name for each output of a ``num_classes``-way head trained on this dataset: the dataset's label
        names, then the index of each output beyond them (``--num-classes`` above the dataset's class count)."""
        names = list(self.label_names or (str(i) for i in range(self.num_classes)))
        return names + [str(i) for i in range(len(names), num_classes)]


_CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
_FASHION_LABELS = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_DIGIT_LABELS = tuple(str(i) for i in range(10))
# CIFAR-100's fine labels in label-index order (the dataset's meta file; alphabetical).
_CIFAR100_LABELS = tuple('''
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm'''.split())
# MedMNIST v2 label dictionaries (medmnist.INFO), in label-index order.
_TISSUE_LABELS = (
    'Collecting Duct, Connecting Tubule', 'Distal Convoluted Tubule', 'Glomerular endothelial cells',
    'Interstitial endothelial cells', 'Leukocytes', 'Podocytes', 'Proximal Tubule Segments', 'Thick Ascending Limb')
_BLOOD_LABELS = (
    'basophil', 'eosinophil', 'erythroblast',
    'immature granulocytes(myelocytes, metamyelocytes and promyelocytes)',
    'lymphocyte', 'monocyte', 'neutrophil', 'platelet')


def _load_tiny_imagenet_wnids() -> Tuple[str, ...]:
    # The 200 WordNet ids of the dataset's wnids.txt, stored sorted: line i is class index i, the order an
    # image folder (and this project) gives the classes.
    path = os.path.join(os.path.dirname(__file__), 'tiny_imagenet_wnids.txt')
    with open(path, encoding='utf-8') as f:
        return tuple(line.strip() for line in f if line.strip())


TINY_IMAGENET_WNIDS = _load_tiny_imagenet_wnids()
# Readable names: the first lemma of each synset in timm's ImageNet lemma table (all 200 are ImageNet-1k
# classes, and their first lemmas are distinct).
_IMAGENET_INFO = ImageNetInfo()  # once: each instance reads timm's label tables (~0.1 s)
_TINY_IMAGENET_LABELS = tuple(
    _IMAGENET_INFO.label_name_to_description(wnid).split(',')[0].strip() for wnid in TINY_IMAGENET_WNIDS)

# PAD-UFES-20 diagnostic codes in sorted order: actinic keratosis, basal cell carcinoma, melanoma,
# nevus, squamous cell carcinoma, seborrheic keratosis.
_PAD_LABELS = ('ACK', 'BCC', 'MEL', 'NEV', 'SCC', 'SEK')

DATASETS: Dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo(
        name='digits', title='scikit-learn digits (UCI optical recognition of handwritten digits)',
        num_classes=10, input_size=(1, 32, 32), mean=(0.3053,), std=(0.3760,), label_names=_DIGIT_LABELS,
        license='cc-by-4.0', homepage='https://archive.ics.uci.edu/dataset/80',
        batch_size=64, train_augment='digits',
        citation='Alpaydin & Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository, 1998.'),
    DatasetInfo(
        name='tiny_imagenet', title='Tiny ImageNet', num_classes=200, input_size=(3, 64, 64),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, label_names=_TINY_IMAGENET_LABELS,
        license='other', homepage='http://cs231n.stanford.edu/tiny-imagenet-200.zip',
        hf_dataset='zh-plus/tiny-imagenet',
        citation='Le & Yang, Tiny ImageNet Visual Recognition Challenge, CS231N, 2015.'),
    DatasetInfo(
        name='cifar10', title='CIFAR-10', num_classes=10, input_size=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), label_names=_CIFAR10_LABELS,
        license='unknown', homepage='https://www.cs.toronto.edu/~kriz/cifar.html', train_augment='cifar',
        citation='Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009.'),
    DatasetInfo(
        # The CNNtention and Attention Shortcuts papers use the official 50k / 10k split; the per-channel
        # statistics of the 50k training images.
        name='cifar100', title='CIFAR-100', num_classes=100, input_size=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), label_names=_CIFAR100_LABELS,
        license='unknown', homepage='https://www.cs.toronto.edu/~kriz/cifar.html', train_augment='cifar',
        citation='Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009.'),
    DatasetInfo(
        name='mnist', title='MNIST', num_classes=10, input_size=(1, 28, 28),
        mean=(0.1307,), std=(0.3081,), label_names=_DIGIT_LABELS,
        license='cc-by-sa-3.0', homepage='http://yann.lecun.com/exdb/mnist/',
        citation='LeCun, Bottou, Bengio & Haffner, Gradient-Based Learning Applied to Document Recognition, '
                 'Proc. IEEE 86(11), 1998.'),
    DatasetInfo(
        name='svhn', title='SVHN (train + test + extra)', num_classes=10, input_size=(3, 32, 32),
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), label_names=_DIGIT_LABELS,
        license='other', homepage='http://ufldl.stanford.edu/housenumbers/',
        citation='Netzer et al., Reading Digits in Natural Images with Unsupervised Feature Learning, 2011.'),
    DatasetInfo(
        name='fashion_mnist', title='Fashion-MNIST', num_classes=10, input_size=(1, 28, 28),
        mean=(0.2860,), std=(0.3530,), label_names=_FASHION_LABELS,
        license='mit', homepage='https://github.com/zalandoresearch/fashion-mnist', train_augment='fashion',
        citation='Xiao, Rasul & Vollgraf, Fashion-MNIST, arXiv:1708.07747, 2017.'),
    DatasetInfo(
        name='tissuemnist', title='TissueMNIST (MedMNIST v2)', num_classes=8, input_size=(3, 64, 64),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, label_names=_TISSUE_LABELS,
        license='cc-by-4.0', homepage='https://medmnist.com/', split=(0.70, 0.10, 0.20), train_augment='medmnist',
        citation='Yang et al., MedMNIST v2, Scientific Data 10:41, 2023.'),
    DatasetInfo(
        name='bloodmnist', title='BloodMNIST (MedMNIST v2)', num_classes=8, input_size=(3, 64, 64),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, label_names=_BLOOD_LABELS,
        license='cc-by-4.0', homepage='https://medmnist.com/', split=(0.70, 0.10, 0.20), train_augment='medmnist',
        citation='Yang et al., MedMNIST v2, Scientific Data 10:41, 2023.'),
    DatasetInfo(
        name='pcam', title='PatchCamelyon', num_classes=2, input_size=(3, 96, 96),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, label_names=('normal', 'metastatic'),
        license='cc0-1.0', homepage='https://github.com/basveeling/pcam', split=(0.80, 0.10, 0.10),
        citation='Veeling et al., Rotation Equivariant CNNs for Digital Pathology, MICCAI 2018.'),
    DatasetInfo(
        name='pad_ufes_20', title='PAD-UFES-20', num_classes=6, input_size=(3, 224, 224),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, label_names=_PAD_LABELS,
        license='cc-by-4.0', homepage='https://data.mendeley.com/datasets/zr7vgbcyr2/1',
        batch_size=64, train_augment='pad_ufes',
        citation='Pacheco et al., PAD-UFES-20, Data in Brief 32:106221, 2020.'),
)}


def get_dataset_info(name: str) -> DatasetInfo:
    """Look a dataset up by name, accepting ``-`` for ``_`` and any case."""
    key = name.strip().lower().replace('-', '_')
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATASETS))}; "
            f"for your own images pass a folder with --data-dir and --dataset folder.")
    return DATASETS[key]

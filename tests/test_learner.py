"""Text-based SASRec: shared hard/soft path, padding and tied embeddings."""

import torch
import torch.nn.functional as F

from bench.learner import LearnerConfig, TextSASRec, pad_sequences


def _model(vectors, **kwargs):
    torch.manual_seed(0)
    model = TextSASRec(vectors[:50], LearnerConfig(hidden=32, layers=2, dropout=0.0, max_len=8, **kwargs))
    return model.eval()


def test_soft_one_hot_equals_hard_loss(games_vectors):
    model = _model(games_vectors)
    seqs = torch.tensor([[3, 7, 9, 1, 4, 12, 5, 8, 2], [6, 5, 4, 3, 2, 1, 11, 12, 13]])
    one_hot = F.one_hot(seqs - 1, num_classes=50).float()
    assert torch.allclose(model.hard_loss(seqs), model.soft_loss(one_hot), atol=1e-5)


def test_left_padding_does_not_change_last_state(games_vectors):
    model = _model(games_vectors)
    short = torch.tensor([[0, 0, 0, 0, 3, 7, 9, 1]])
    longer_pad = torch.tensor(pad_sequences([[3, 7, 9, 1]], 8))
    assert torch.equal(short, longer_pad)
    alone = model.last_hidden(short)
    batch = model.last_hidden(torch.cat([short, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])]))
    assert torch.allclose(alone[0], batch[0], atol=1e-6)


def test_padding_is_not_attended(games_vectors):
    model = _model(games_vectors)
    # Changing what sits in padded slots must not matter: pads are zeroed and masked.
    seqs = torch.tensor([[0, 0, 0, 0, 3, 7, 9, 1]])
    base = model.last_hidden(seqs)
    emb = model.item_embeddings()
    inputs = model.embed_hard(seqs, emb)
    inputs[0, :4] = 5.0
    changed = model.encode(inputs, seqs == 0)[:, -1]
    assert torch.allclose(base, changed, atol=1e-6)


def test_every_history_item_is_attended(games_vectors):
    model = _model(games_vectors)
    with_first = model.last_hidden(torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]]))
    without_first = model.last_hidden(torch.tensor([[0, 0, 0, 0, 0, 2, 3, 4]]))
    assert not torch.allclose(with_first, without_first)


def test_input_and_output_embeddings_are_tied(games_vectors):
    model = _model(games_vectors)
    emb = model.item_embeddings()
    table = model.embed_hard(torch.tensor([[1, 2]]), emb)[0]
    assert torch.equal(table, emb[:2])


def test_hard_loss_ignores_padding_targets(games_vectors):
    model = _model(games_vectors)
    a = model.hard_loss(torch.tensor([[0, 0, 0, 0, 0, 3, 7, 9, 1]]))
    b = model.hard_loss(torch.tensor([[3, 7, 9, 1]]))
    assert torch.allclose(a, b, atol=1e-5)


def test_gradients_reach_adapter_not_text(games_vectors):
    model = _model(games_vectors)
    model.train()
    model.hard_loss(torch.tensor([[1, 2, 3, 4, 5]])).backward()
    assert model.adapter[0].weight.grad is not None
    assert not model.text.requires_grad

"""Evaluator on real loader output: masking, padding id, batch size, repeatability."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.data import DatasetConfig, load_dataset
from bench.evaluator import Protocol, evaluate_popularity, evaluate_set, rank_split
from bench.learner import LearnerConfig, TextSASRec
from bench.metrics import metrics_from_ranks
from bench.synthetic import SyntheticSet
from tests.conftest import write_atomic

NO_FILTER = DatasetConfig(kcore=0)


def _vectors(data, dim=16, seed=0):
    # Random text vectors: these tests check ranking logic, not text quality.
    return torch.randn(data.n_items, dim, generator=torch.Generator().manual_seed(seed))


def _model(data, seed=0, **learner):
    torch.manual_seed(seed)
    return TextSASRec(_vectors(data), LearnerConfig(hidden=16, layers=1, dropout=0.0, max_len=10, **learner)).eval()


def test_item_zero_is_a_real_item(tmp_path):
    rows = [("u1", 0, 1), ("u1", 1, 2), ("u1", 2, 3), ("u1", 3, 4), ("u2", 1, 1), ("u2", 2, 2), ("u2", 0, 3)]
    data = load_dataset("pad", data_dir=write_atomic(tmp_path, "pad", rows), config=NO_FILTER)
    assert data.n_items == 4
    model = _model(data)
    assert model.item_embeddings().shape[0] + 1 == 5
    ranks = rank_split(model, data, "test")
    # History masking leaves u1 one candidate and u2 two, so Recall@2 is 1 whatever the model does.
    assert metrics_from_ranks(ranks, (2,))["recall@2"] == 1.0
    assert ranks.max() <= 2


def test_item_zero_changes_scores_when_removed(tmp_path):
    rows = [("u1", 0, 1), ("u1", 1, 2), ("u1", 2, 3), ("u1", 3, 4)]
    data = load_dataset("pad0", data_dir=write_atomic(tmp_path, "pad0", rows), config=NO_FILTER)
    model = _model(data)
    zero_id = data.item_ids.index("0") + 1
    seq = torch.tensor([[zero_id, data.item_ids.index("1") + 1]])
    without = torch.tensor([[0, data.item_ids.index("1") + 1]])
    assert not torch.allclose(model.last_hidden(seq), model.last_hidden(without))


def test_short_users_not_in_denominator(tmp_path):
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2), ("u3", "c", 5)]
    data = load_dataset("short", data_dir=write_atomic(tmp_path, "short", rows), config=NO_FILTER)
    result = evaluate_popularity(data, Protocol(ks=(10,), select_metric="ndcg@10"))
    # u1 has c as test target and a, b in history: c is the only candidate left.
    assert result["test"]["recall@10"] == 1.0
    assert result["users"] == "1 of 3 users evaluated; 2 have fewer than 3 interactions"


def test_eval_batch_size_does_not_change_metrics(shared_data):
    data = load_dataset("steam", data_dir=shared_data, config=DatasetConfig(sample_users=600, sample_seed=1))
    model = _model(data)
    results = [metrics_from_ranks(rank_split(model, data, "test", batch_size=b), (10,)) for b in (1, 7, 4096)]
    for other in results[1:]:
        for key in ("recall@10", "ndcg@10", "mrr@10"):
            assert abs(other[key] - results[0][key]) <= 1e-6


def test_popularity_ranks_deterministic_on_real_data(shared_data):
    data = load_dataset("steam", data_dir=shared_data)
    protocol = Protocol()
    first = evaluate_popularity(data, protocol)
    second = evaluate_popularity(data, protocol)
    assert first["test"] == second["test"]
    assert first["users"].startswith(f"{data.n_users} of {data.n_users}")


def test_training_repeats_bit_identically(shared_data, games_vectors):
    data = load_dataset("steam", data_dir=shared_data, config=DatasetConfig(sample_users=400, sample_seed=0))
    vectors = torch.randn(data.n_items, 32, generator=torch.Generator().manual_seed(0))
    protocol = Protocol(learner=LearnerConfig(hidden=16, layers=1, max_len=20), max_steps=20, eval_every=10)
    seqs = [s for s in data.train_seqs if len(s) >= 2]
    full = SyntheticSet.from_sequences(seqs, data.n_items, 21)
    a = evaluate_set(full, data, vectors, protocol, seed=3, progress=False)
    b = evaluate_set(full, data, vectors, protocol, seed=3, progress=False)
    assert a["test"] == b["test"]
    assert a["valid"] == b["valid"]


def test_protocol_hash_ignores_eval_batch_size():
    assert Protocol().hash() == dataclasses.replace(Protocol(), eval_batch_size=7).hash()
    assert Protocol().hash() != dataclasses.replace(Protocol(), lr=0.01).hash()


def test_protocol_rejects_unknown_select_metric():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="select_metric"):
        Protocol(select_metric="ndcg@5")


def test_ties_rank_against_target():
    from bench.evaluator import _target_ranks

    scores = torch.zeros(1, 5)
    ranks = _target_ranks(scores, torch.tensor([[0]]), torch.tensor([3]))
    assert int(ranks[0]) == 5


def test_target_in_history_still_competes():
    from bench.evaluator import _target_ranks

    scores = torch.tensor([[0.1, 0.9, 0.3]])
    ranks = _target_ranks(scores, torch.tensor([[2, 1]]), torch.tensor([2]))
    assert int(ranks[0]) == 1


def test_full_learner_beats_popularity_on_games_slice(shared_data):
    from bench.text import EncoderConfig, encode_items

    data = load_dataset("games", data_dir=shared_data, config=DatasetConfig(sample_users=3000, sample_seed=0))
    vectors, _ = encode_items(data.item_texts, EncoderConfig(max_length=32))
    seqs = [s for s in data.train_seqs if len(s) >= 2]
    full = SyntheticSet.from_sequences(seqs, data.n_items, 51)
    protocol = Protocol(max_steps=240, eval_every=40, patience=3, batch_size=128)
    learned = evaluate_set(full, data, torch.from_numpy(vectors), protocol, seed=0, progress=False)
    pop = evaluate_popularity(data, protocol)
    assert learned["test"]["ndcg@10"] > pop["test"]["ndcg@10"]


def test_batch_order_ignores_model_size_and_global_rng():
    from bench.evaluator import _BatchSource

    synthetic = SyntheticSet.from_sequences([[i, i + 1, i + 2] for i in range(1, 40)], n_items=45, max_len=3)
    firsts = []
    for hidden, global_seed in ((64, 0), (128, 123)):
        torch.manual_seed(global_seed)
        TextSASRec(torch.randn(45, 8), LearnerConfig(hidden=hidden, heads=1))  # consumes the global generator
        source = _BatchSource(synthetic, max_len=10, batch_size=8, generator=torch.Generator().manual_seed(1))
        firsts.append([source.next() for _ in range(3)])
    for a, b in zip(*firsts):
        assert torch.equal(a, b)


def test_training_logs_scores_without_terminal(shared_data, caplog):
    # pytest captures stderr, so the progress bar is hidden as in a log file.
    data = load_dataset("steam", data_dir=shared_data, config=DatasetConfig(sample_users=200, sample_seed=0))
    vectors = torch.randn(data.n_items, 16, generator=torch.Generator().manual_seed(0))
    protocol = Protocol(learner=LearnerConfig(hidden=16, layers=1, max_len=20), max_steps=20, eval_every=10)
    full = SyntheticSet.from_sequences([s for s in data.train_seqs if len(s) >= 2], data.n_items, 21)
    with caplog.at_level("INFO", logger="bench.evaluator"):
        evaluate_set(full, data, vectors, protocol, seed=0, progress=True)
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage() and "valid" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("train seed 0: step 10/20")
    caplog.clear()
    with caplog.at_level("INFO", logger="bench.evaluator"):
        evaluate_set(full, data, vectors, protocol, seed=0, progress=False)
    assert not [r for r in caplog.records if "valid ndcg" in r.getMessage()]

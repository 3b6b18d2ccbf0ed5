"""Retrieval and QA metrics: hand-computed cases and parity with naive full-matrix computations."""

import numpy as np
import pytest
import torch

from evl.data.answers import AnswerVocab, normalize_answer
from evl.tasks.qa import majority_baseline, mc_accuracy, qa_accuracy
from evl.tasks.retrieval import (
    chance_recall,
    rerank_t2v,
    retrieval_metrics,
    similarity_topk,
    text_to_video_ranks,
    video_to_text_ranks,
)


def _naive_metrics(text, video, t2v_map):
    """Full matrix, argsort-based ranks: an independent implementation."""
    sim = (text @ video.t()).numpy()
    t2v = []
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        t2v.append(int(np.where(order == int(t2v_map[i]))[0][0]) + 1)
    v2t = []
    for v in range(sim.shape[1]):
        order = np.argsort(-sim[:, v], kind="stable")
        caps = set(np.where(t2v_map.numpy() == v)[0].tolist())
        if caps:
            v2t.append(min(int(np.where(order == c)[0][0]) for c in caps) + 1)
    out = {}
    for name, ranks in (("t2v", np.array(t2v)), ("v2t", np.array(v2t))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{name}_medr"] = float(np.median(ranks))
        out[f"{name}_meanr"] = float(np.mean(ranks))
    return out


def _data(nt=120, nv=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(nv, d, generator=g)
    t2v_map = torch.arange(nt) % nv  # three captions per video
    t2v_map = t2v_map[torch.randperm(nt, generator=g)]
    text = video[t2v_map] * 0.3 + torch.randn(nt, d, generator=g)  # noisy: ranks spread out
    return text, video, t2v_map


def test_similarity_topk_matches_full_topk_in_chunks():
    text, video, _ = _data()
    s_ref, i_ref = (text @ video.t()).topk(7, dim=1)
    s, i = similarity_topk(text, video, 7, chunk_size=11)
    assert torch.equal(i, i_ref) and torch.allclose(s, s_ref)
    s, i = similarity_topk(text, video, 1000)  # clamped to the gallery
    assert i.shape == (120, 40)


def test_similarity_topk_width_mismatch_message():
    with pytest.raises(ValueError, match="expected D=4, got 5"):
        similarity_topk(torch.randn(2, 4), torch.randn(3, 5), 1)


def test_retrieval_metrics_equal_naive_and_chunk_invariant():
    text, video, t2v_map = _data()
    ref = _naive_metrics(text, video, t2v_map)
    m4096 = retrieval_metrics(text, video, t2v_map)
    m7 = retrieval_metrics(text, video, t2v_map, chunk_size=7)
    for key, value in ref.items():
        assert m4096[key] == pytest.approx(value), key
        assert m7[key] == pytest.approx(m4096[key]), key
    assert 0 < m4096["t2v_r1"] < 100 and m4096["t2v_medr"] > 1  # non-trivial case
    assert m4096["t2v_num_queries"] == 120 and m4096["v2t_num_queries"] == 40


def test_retrieval_hand_computed_multi_caption():
    video = torch.eye(3)
    # captions 0,1 -> video 0; caption 2 -> video 1; caption 3 -> video 2.
    text = torch.tensor([[0.0, 1.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    t2v_map = torch.tensor([0, 0, 1, 2])
    # t2v: caption0 scores video1 highest -> rank 2; caption1 rank 1; caption2 -> video2 top, rank 2;
    # caption3 rank 1.
    assert text_to_video_ranks(text, video, t2v_map).tolist() == [2, 1, 2, 1]
    # v2t: video0's captions score [0, .9, 0, 0] -> caption1 is top -> rank 1.
    # video1 scores [1, 0, 0, 0]: its caption 2 (score 0) ties with 3 wrong captions and loses to 1.
    # video2 scores [0, 0, 1, .5]: caption 2 (wrong) beats caption 3 -> rank 2.
    assert video_to_text_ranks(text, video, t2v_map).tolist() == [1, 2, 2]
    assert video_to_text_ranks(text, video, t2v_map, ties="pessimistic").tolist() == [1, 4, 2]
    m = retrieval_metrics(text, video, t2v_map)
    assert m["t2v_r1"] == 50.0 and m["t2v_r5"] == 100.0 and m["t2v_medr"] == 1.5 and m["t2v_meanr"] == 1.5
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_medr"] == 2.0


def test_ties_collapsed_embeddings():
    text, video = torch.ones(4, 3), torch.ones(4, 3)
    t2v_map = torch.arange(4)
    assert retrieval_metrics(text, video, t2v_map)["t2v_r1"] == 100.0  # optimistic, documented hazard
    pess = retrieval_metrics(text, video, t2v_map, ties="pessimistic")
    assert pess["t2v_r1"] == 0.0 and pess["t2v_meanr"] == 4.0


def test_video_without_caption_left_out_of_v2t():
    video = torch.eye(3)
    text = torch.eye(3)[:2]
    m = retrieval_metrics(text, video, torch.tensor([0, 1]))
    assert m["v2t_num_queries"] == 2 and m["v2t_r1"] == 100.0


def test_retrieval_mapping_errors():
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        retrieval_metrics(torch.randn(3, 2), torch.randn(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0, 2]))


def test_rerank_with_oracle_and_reversed_scores():
    text, video, t2v_map = _data(nt=60, nv=30, seed=1)
    _, topk = similarity_topk(text, video, 10)
    in_topk = (topk == t2v_map[:, None]).any(1).double().mean().item() * 100
    assert 0 < in_topk < 100  # some ground truths fall outside the shortlist

    def oracle(ti, vi):
        return (t2v_map[ti] == vi).float()

    m = rerank_t2v(topk, oracle, t2v_map, batch_size=7)
    assert m["t2v_r1"] == pytest.approx(in_topk) and m["t2v_r10"] == pytest.approx(in_topk)
    assert m["t2v_in_topk"] == pytest.approx(in_topk) and m["rerank_k"] == 10

    dual = text @ video.t()

    def reversed_dual(ti, vi):
        return -dual[ti, vi]

    rev = rerank_t2v(topk, reversed_dual, t2v_map)
    pos = (topk == t2v_map[:, None]).float().argmax(1)  # 0-based position in the dual shortlist
    hit = (topk == t2v_map[:, None]).any(1)
    new_rank = 10 - pos  # reversed order
    assert rev["t2v_r1"] == pytest.approx(100 * (hit & (new_rank <= 1)).double().mean().item())
    assert rev["t2v_r5"] == pytest.approx(100 * (hit & (new_rank <= 5)).double().mean().item())


def test_rerank_miss_never_counts_even_for_small_k():
    topk = torch.tensor([[1, 2], [0, 1]])
    m = rerank_t2v(topk, lambda t, v: torch.zeros(len(t)), torch.tensor([0, 1]))
    assert m["t2v_r1"] == 50.0 and m["t2v_r10"] == 50.0  # text 0's video is not in its top-2


def test_chance_recall():
    assert chance_recall(1000, 10) == 1.0
    assert chance_recall(5, 10) == 100.0
    with pytest.raises(ValueError):
        chance_recall(0, 1)


# ---------------------------------------------------------------- QA


def test_answer_vocab_build_encode_decode_json():
    train = ["dog", "cat", "Dog ", "man", "cat", "dog", "tree"]
    vocab = AnswerVocab.build(train, min_count=2)
    assert vocab.answers == ["dog", "cat"] and vocab.counts == [3, 2]
    assert vocab.encode("DOG") == 0 and vocab.encode("man") == -100
    assert vocab.decode(1) == "cat" and "cat" in vocab and len(vocab) == 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode(-100)
    again = AnswerVocab.from_json(vocab.to_json())
    assert again.answers == vocab.answers and again.counts == vocab.counts
    assert AnswerVocab.build(train, max_size=3).answers == ["dog", "cat", "man"]  # ties alphabetical
    with pytest.raises(ValueError, match="not an AnswerVocab"):
        AnswerVocab.from_json("[1, 2]")


def test_qa_accuracy_overall_and_per_type():
    pred = ["dog", "Cat", "red", "blue"]
    gold = ["dog", "cat", "green", "blue"]
    types = ["what", "what", "color", "color"]
    m = qa_accuracy(pred, gold, types)
    assert m["accuracy"] == 75.0 and m["count"] == 4
    assert m["per_type"] == {"color": 50.0, "what": 100.0}
    assert m["count_per_type"] == {"color": 2, "what": 2}
    with pytest.raises(ValueError, match="lengths differ"):
        qa_accuracy(["a"], ["a", "b"])


def test_majority_baselines():
    train = ["white", "white", "man", "man", "man", "white"]
    train_types = ["color", "color", "who", "who", "who", "color"]
    # global majority: tie 3-3 -> alphabetical "man".
    test = ["white", "white", "man", "black"]
    test_types = ["color", "color", "who", "color"]
    m = majority_baseline(train, test, test_types, train_types)
    assert m["answer"] == "man" and m["accuracy"] == 25.0
    assert m["per_type"] == {"color": 0.0, "who": 100.0}
    strong = m["per_type_majority"]
    assert strong["answers"] == {"color": "white", "who": "man"}
    assert strong["accuracy"] == 75.0 and strong["per_type"]["color"] == pytest.approx(200 / 3)
    assert "per_type_majority" not in majority_baseline(train, test, test_types)


def test_mc_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.1], [0.0, 0.0, 1.0]])
    assert mc_accuracy(scores, torch.tensor([1, 1, 2])) == pytest.approx(200 / 3)  # tie -> first option
    with pytest.raises(ValueError, match="expected scores"):
        mc_accuracy(scores, torch.tensor([1, 2]))


def test_normalize_answer():
    assert normalize_answer("  A   Red\tCar ") == "a red car"

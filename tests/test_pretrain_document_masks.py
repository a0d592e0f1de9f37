"""scripts/pretrain_gpt.py with --reset-attention-mask --reset-position-ids (mock data has EOD
tokens, so every sequence holds several documents): the token pipeline's losses equal stock
1F1B's (fp32, 1e-5), and the document masks change the training (the trainer used to build
no masks and pass none, silently training across documents)."""

from __future__ import annotations

from test_pretrain import RTOL, TINY, _check, losses, torchrun

FLAGS = ["--config", TINY, "--train-iters", "3", "--eval-iters", "0"]
DOCUMENTS = ["--reset-attention-mask", "--reset-position-ids"]


def test_document_masks_token_pipeline_equals_stock():
    stock = losses(_check(torchrun(FLAGS + DOCUMENTS)))
    token = losses(
        _check(torchrun(FLAGS + DOCUMENTS + ["--token-pipeline", "--token-pipeline-slices",
                                             "40,24,64"]))
    )
    plain = losses(_check(torchrun(FLAGS + ["--reset-position-ids"])))
    assert sorted(stock) == sorted(token) == [1, 2, 3]
    for it in stock:
        assert abs(token[it] - stock[it]) <= RTOL * abs(stock[it]), (it, token, stock)
    # The mask is applied: without it the same data trains to other losses.
    assert any(abs(plain[it] - stock[it]) > 1e-4 * abs(stock[it]) for it in stock), plain

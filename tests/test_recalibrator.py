"""The Recalibrator: paper parameter counts from config alone, causality, NPE, and a reference decoder."""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config

from minigenrecal.recalibrator import Recalibrator, count_parameters, text_dims


def test_paper_parameter_counts_from_config_on_meta():
    qwen2_7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
    internlm25_7b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8)
    for cfg, paper in ((qwen2_7b, 524.8e6), (internlm25_7b, 503.3e6)):
        n = count_parameters(8192, cfg)
        assert abs(n - paper) / paper < 1e-3, (n, paper)
    with torch.device("meta"):
        r = Recalibrator(8192, qwen2_7b)
    assert all(p.is_meta for p in r.parameters())
    assert text_dims(qwen2_7b)["qkv_bias"] and not text_dims(internlm25_7b)["qkv_bias"]
    assert count_parameters(8192, qwen2_7b, depth=1) < count_parameters(8192, qwen2_7b, depth=2)


def _small():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      rms_norm_eps=1e-6)
    torch.manual_seed(0)
    return Recalibrator(48, cfg), cfg


def test_blocks_match_a_reference_llama_decoder():
    recal, cfg = _small()
    cfg.num_hidden_layers = 2
    ref = LlamaModel(cfg).eval()
    with torch.no_grad():
        for blk, layer in zip(recal.blocks, ref.layers):
            a, m = layer.self_attn, layer.mlp
            for mine, theirs in ((blk.q, a.q_proj), (blk.k, a.k_proj), (blk.v, a.v_proj), (blk.o, a.o_proj),
                                 (blk.gate, m.gate_proj), (blk.up, m.up_proj), (blk.down, m.down_proj)):
                mine.weight.copy_(theirs.weight)
            blk.norm1.weight.copy_(torch.rand(32) + 0.5)
            blk.norm2.weight.copy_(torch.rand(32) + 0.5)
            layer.input_layernorm.weight.copy_(blk.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(blk.norm2.weight)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)
    h = x
    for blk in recal.blocks:
        h = blk(h, pos)
    expected = ref(inputs_embeds=x).last_hidden_state  # = final_norm(layers(x))
    torch.testing.assert_close(ref.norm(h), expected, rtol=1e-4, atol=1e-5)


def test_causal_and_right_padding_does_not_touch_real_tokens():
    recal, _ = _small()
    z_q = [torch.randn(3, 32), torch.randn(5, 32)]
    z_a = [torch.randn(4, 48), torch.randn(1, 48)]  # lengths 7 and 6: sample 1 is right-padded
    out = recal(z_q, z_a)
    assert out.shape == (2, 7, 48)
    with torch.no_grad():  # each sample equals its own composition by hand, without padding
        torch.testing.assert_close(out[0], _explicit(recal, z_q[0], z_a[0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1, :6], _explicit(recal, z_q[1], z_a[1]), rtol=1e-4, atol=1e-5)
    # changing the last answer input changes only the last position
    z_a2 = [z_a[0].clone(), z_a[1]]
    z_a2[0][-1] += 1.0
    out2 = recal(z_q, z_a2)
    torch.testing.assert_close(out2[0, :6], out[0, :6])
    assert not torch.allclose(out2[0, 6], out[0, 6])


def _explicit(recal, z_q, z_a, shift=0):
    """One sample by hand: [z_q, proj_pre(z_a)] -> blocks at positions shift .. shift+T-1 -> proj_post -> LayerNorm."""
    x = torch.cat([z_q, z_a @ recal.proj_pre.weight.T + recal.proj_pre.bias])[None]  # (1, T, d_s)
    pos = torch.arange(x.shape[1]) + shift
    for blk in recal.blocks:
        x = blk(x, pos)
    y = x @ recal.proj_post.weight.T + recal.proj_post.bias  # (1, T, d_l)
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return ((y - mu) / torch.sqrt(var + recal.norm.eps) * recal.norm.weight + recal.norm.bias)[0]


def _recal_with_affine_norm():
    recal, _ = _small()
    with torch.no_grad():  # a non-trivial LayerNorm affine, so the norm's parameters are exercised too
        recal.norm.weight.copy_(torch.rand(48) + 0.5)
        recal.norm.bias.copy_(torch.randn(48))
    return recal


def test_forward_is_proj_pre_then_blocks_at_arange_positions_then_proj_post_then_layernorm():
    recal = _recal_with_affine_norm()
    z_q = [torch.randn(3, 32), torch.randn(5, 32)]
    z_a = [torch.randn(4, 48), torch.randn(1, 48)]
    with torch.no_grad():
        out = recal(z_q, z_a)
        for b, (q, a) in enumerate(zip(z_q, z_a)):
            ref = _explicit(recal, q, a)
            torch.testing.assert_close(out[b, : len(ref)], ref, rtol=1e-4, atol=1e-5)
            # undoing the LayerNorm affine leaves zero-mean rows at d_l
            y = (out[b, : len(ref)] - recal.norm.bias) / recal.norm.weight
            torch.testing.assert_close(y.mean(-1), torch.zeros(len(ref)), atol=1e-4, rtol=0)


def test_npe_is_relative_shifting_positions_changes_nothing_and_dropping_rope_changes_the_output(monkeypatch):
    """RoPE attention depends on position differences only: a constant shift of the NPE ids leaves the output
    unchanged; without RoPE (positions ignored) the output changes, so the positions are really used."""
    from minigenrecal import recalibrator
    recal = _recal_with_affine_norm()
    q, a = torch.randn(4, 32), torch.randn(3, 48)
    with torch.no_grad():
        out = recal([q], [a])[0]
        torch.testing.assert_close(_explicit(recal, q, a, shift=11), out, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(recalibrator, "rope", lambda x, pos, theta: x)
        no_rope = _explicit(recal, q, a)
    assert (no_rope - out).abs().max() > 1e-2, "dropping RoPE must change the output"


def test_no_embedding_or_head_of_its_own():
    recal, _ = _small()
    assert not any(isinstance(m, torch.nn.Embedding) for m in recal.modules())
    assert isinstance(recal.norm, torch.nn.LayerNorm) and recal.norm.normalized_shape == (48,)
    assert recal.proj_pre.in_features == 48 and recal.proj_post.out_features == 48
    assert len(recal.blocks) == 2

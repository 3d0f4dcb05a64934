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


# -- every block dimension from the student's text config, per family ------------------------------------------------
def test_the_tiny_students_recalibrator_is_unchanged():
    """The committed tiny numbers rest on it: same parameter names, count and seed-0 initial weights."""
    from minigenrecal.models.tiny import build_student
    from minigenrecal.study.teacher import weights_digest
    cfg = build_student(0)[0].config.get_text_config()
    torch.manual_seed(0)
    recal = Recalibrator(192, cfg)
    names = [n for n, _ in recal.named_parameters()]
    per_block = [f"{m}.weight" for m in ("norm1", "norm2", "q", "k", "v", "o", "gate", "up", "down")]
    outer = ["proj_pre.weight", "proj_pre.bias", "proj_post.weight", "proj_post.bias", "norm.weight", "norm.bias"]
    assert sorted(names) == sorted(outer + [f"blocks.{i}.{n}" for i in (0, 1) for n in per_block])
    assert sum(p.numel() for p in recal.parameters()) == 240672
    assert weights_digest(recal) == "b1421659f737731e9c915d1ebba5739c8f5d0e28c3bbf2c6c79e79d477b7eabc"


def test_biases_activation_and_scale_come_from_the_config():
    from transformers import Gemma3TextConfig, Qwen2_5_VLConfig
    qwen25 = text_dims(Qwen2_5_VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4)).get_text_config())
    assert qwen25["qkv_bias"] and not qwen25["o_bias"]  # model_type 'qwen2_5_vl_text'
    biased = text_dims(LlamaConfig(hidden_size=32, num_attention_heads=4, attention_bias=True, mlp_bias=True,
                                   hidden_act="gelu"))
    assert biased["qkv_bias"] and biased["o_bias"] and biased["mlp_bias"] and biased["act"] == "gelu"
    gemma3 = text_dims(Gemma3TextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, query_pre_attn_scalar=24))
    assert gemma3["theta"] == 1_000_000.0  # its full-attention layers' base, not the 10000 fallback
    assert gemma3["act"] == "gelu_pytorch_tanh" and gemma3["head_dim"] == 16 and gemma3["attn_scale"] == 24 ** -0.5
    block = Recalibrator(32, LlamaConfig(hidden_size=32, num_attention_heads=4, attention_bias=True)).blocks[0]
    assert block.o.bias is not None and block.q.bias is not None and block.gate.bias is None


def _reference_text_model(cfg):
    """The family's own text decoder from its text config, 2 layers, causal (PaliGemma's marks it bidirectional:
    the VLM builds its own prefix mask)."""
    import copy
    from transformers import AutoModel
    cfg = copy.deepcopy(cfg)
    cfg.num_hidden_layers = 2
    if getattr(cfg, "use_bidirectional_attention", None):
        cfg.use_bidirectional_attention = False
    return AutoModel.from_config(cfg).eval()


def _copy_into_reference(recal, ref, norm_offset: float):
    """The Recalibrator's block weights into the reference layers (Gemma's RMSNorm scales by 1 + weight)."""
    with torch.no_grad():
        for blk, layer in zip(recal.blocks, ref.layers):
            a, m = layer.self_attn, layer.mlp
            for mine, theirs in ((blk.q, a.q_proj), (blk.k, a.k_proj), (blk.v, a.v_proj), (blk.o, a.o_proj),
                                 (blk.gate, m.gate_proj), (blk.up, m.up_proj), (blk.down, m.down_proj)):
                assert (mine.bias is None) == (theirs.bias is None)
                theirs.weight.copy_(mine.weight)
                if mine.bias is not None:
                    mine.bias.normal_()
                    theirs.bias.copy_(mine.bias)
            for mine, theirs in ((blk.norm1, layer.input_layernorm), (blk.norm2, layer.post_attention_layernorm)):
                mine.weight.copy_(torch.rand_like(mine.weight) + 0.5)
                theirs.weight.copy_(mine.weight - norm_offset)


def _standard_configs():
    from minigenrecal.models.families import FAMILIES
    biased = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=True, mlp_bias=True, hidden_act="gelu", rope_theta=500.0)
    cases = [pytest.param(biased, id="llama-biases-gelu")]
    for key, f in FAMILIES.items():
        if f.standard_layer:
            model, _ = f.build(seed=0, d=f.width or 32, layers=2)  # as many layers as Recalibrator blocks
            cases.append(pytest.param(model.config.get_text_config(), id=key))
    return cases


@pytest.mark.parametrize("cfg", _standard_configs())
def test_blocks_match_the_familys_own_decoder_layer(cfg):
    torch.manual_seed(0)
    recal = Recalibrator(48, cfg)
    ref = _reference_text_model(cfg)
    gemma = cfg.model_type.startswith("gemma")
    _copy_into_reference(recal, ref, 1.0 if gemma else 0.0)
    d = cfg.hidden_size
    x = torch.randn(2, 7, d)
    with torch.no_grad():
        h = x
        for blk in recal.blocks:
            h = blk(h, torch.arange(7))
        expected = ref(inputs_embeds=x).last_hidden_state  # = final_norm(layers(x))
    torch.testing.assert_close(ref.norm(h), expected, rtol=1e-4, atol=1e-4)


def test_npe_off_keeps_each_parts_own_positions():
    """NPE off (the paper's ablation): the question at 0..Lq-1, the teacher's answer features from its Lq_l on. With
    Lq_l = Lq the positions are NPE's and the output is the same; with another Lq_l the question rows (which never
    see the answer, causally) are unchanged and the answer rows equal a hand run at the jumped positions."""
    recal = _recal_with_affine_norm()
    off = Recalibrator(48, _small()[1], npe=False)
    off.load_state_dict(recal.state_dict())
    z_q, z_a = [torch.randn(3, 32), torch.randn(5, 32)], [torch.randn(4, 48), torch.randn(1, 48)]
    with torch.no_grad():
        same = off(z_q, z_a, a_pos=[3, 5])
        torch.testing.assert_close(same, recal(z_q, z_a))
        jumped = off(z_q, z_a, a_pos=[9, 2])
        for b, (q, a, p) in enumerate(zip(z_q, z_a, [9, 2])):
            x = torch.cat([q, recal.proj_pre(a)])[None]
            pos = torch.cat([torch.arange(len(q)), torch.arange(len(a)) + p])
            for blk in recal.blocks:
                x = blk(x, pos)
            ref = recal.norm(recal.proj_post(x))[0]
            torch.testing.assert_close(jumped[b, : len(ref)], ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(jumped[b, : len(q)], same[b, : len(q)], rtol=1e-4, atol=1e-5)
        assert (jumped[0, 3:7] - same[0, 3:7]).abs().max() > 1e-3, "the jump must change the answer rows"
    with pytest.raises(ValueError, match="a_pos"):
        off(z_q, z_a)

"""--dtype auto: the dtype every script computes in unless told, decided by the hardware."""
import pytest
import torch

from model import precision


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has these native bf16 instruction sets."""
    def set_flags(*names):
        monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: names)
    return set_flags


def test_auto_on_a_cpu_with_native_bf16_is_bf16(cpu_flags):
    cpu_flags("amx_bf16", "avx512_bf16")
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and "AMX_BF16" in why


def test_auto_on_a_cpu_without_native_bf16_is_fp32(cpu_flags):
    cpu_flags()  # AVX2 only: bf16 would be emulated, several times slower than fp32
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no native bf16" in why


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_where_the_card_has_it_else_fp16(monkeypatch, native, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.resolve_dtype("auto", "cuda:1")[0] == expected
    assert asked == {"including_emulation": False}  # emulated bf16 is the slow case auto avoids


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_wins(cpu_flags, name):
    cpu_flags()
    assert precision.resolve_dtype(name, "cpu") == (getattr(torch, name), "as asked")


def test_the_cpu_flags_are_read_from_cpuinfo():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    precision.cpu_bf16_instructions.cache_clear()
    assert set(precision.cpu_bf16_instructions()) == {"amx_bf16", "avx512_bf16"} & set(flags)


def test_every_script_defaults_to_auto():
    import trainer.config
    from cli import add_model_args
    import argparse
    assert trainer.config.build_parser("t").get_default("dtype") == "auto"
    assert add_model_args(argparse.ArgumentParser()).get_default("dtype") == "auto"


@pytest.mark.parametrize("flags, attention_dtype", [(("avx512_bf16",), torch.float32),
                                                     (("amx_bf16", "avx512_bf16"), torch.bfloat16)])
def test_attention_on_a_cpu_without_amx_computes_in_fp32_under_bf16(monkeypatch, cpu_flags, flags, attention_dtype):
    """PyTorch's CPU attention kernel is slower in bf16 than in fp32 without AMX (docs/performance.md):
    there the LLM hands it fp32, and the rest of the step keeps the compute dtype."""
    from model import model_minimind
    from conftest import TINY_LLM
    cpu_flags(*flags)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    torch.manual_seed(0)
    llm = model_minimind.MiniMindForCausalLM(model_minimind.MiniMindConfig(**{**TINY_LLM, "vocab_size": 300}))
    ids = torch.randint(0, 300, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = llm(ids, labels=ids)
    assert seen and set(seen) == {attention_dtype}
    assert out.logits.dtype == torch.bfloat16  # the head still ran in bf16
    exact = llm(ids, labels=ids).loss  # all in fp32
    assert abs(out.loss.item() - exact.item()) < 0.05

"""Which dtype a run computes in when the user says `--dtype auto` (the default everywhere).

bf16 halves memory traffic and, where the hardware has bf16 arithmetic, runs matmuls several times
faster than fp32. Where it has none, PyTorch emulates it and bf16 is several times *slower* (a CPU
with AVX2 only, most laptops). So `auto` asks the hardware:
  CUDA: bf16 where the card computes it natively (Ampere and later), else fp16 (trainers add a
        GradScaler);
  CPU:  bf16 with AMX or AVX-512 BF16 instructions, else fp32.
docs/performance.md has the measurements behind this rule.

torch is imported inside the functions: the scripts build their flags (DTYPES) before torch
loads, so that --help answers at once.
"""
import functools
import platform

DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_device(name):
    """--device: 'auto' -> 'cuda:0' where CUDA is available, else 'cpu'; any other name as given."""
    if name != "auto":
        return name
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def cpu_bf16_instructions():
    """The CPU's native bf16 instruction sets ('amx_bf16', 'avx512_bf16'), read from /proc/cpuinfo;
    () where there are none or the file is not there (not Linux: fp32 is the safe answer)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(name for name in ("amx_bf16", "avx512_bf16") if name in flags)


def cpu_attention_in_fp32():
    """Whether the LLM hands attention fp32 inputs on this CPU, whatever the compute dtype: PyTorch's
    fused CPU attention converts bf16 to fp32 inside the kernel where there is no AMX, and runs
    slower than when it is given fp32 (docs/performance.md). With AMX, where the bf16 kernel has a
    path of its own, it is not."""
    return "amx_bf16" not in cpu_bf16_instructions()


def resolve_dtype(name, device):
    """'auto' (or an explicit name) and a device string -> (torch dtype, why, in a few words)."""
    import torch
    if name != "auto":
        return getattr(torch, name), "as asked"
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "auto: the GPU computes bf16 natively"
        return torch.float16, "auto: the GPU has no native bf16"
    found = cpu_bf16_instructions()
    if found:
        return torch.bfloat16, f"auto: the CPU has {' and '.join(found).upper()}"
    return torch.float32, f"auto: the CPU ({platform.machine()}) has no native bf16, where bf16 is slower than fp32"


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16", as --dtype spells it."""
    return str(dtype).removeprefix("torch.")


def describe(dtype, why):
    """The one line a script prints about its choice."""
    return f"dtype {dtype_name(dtype)} ({why})"


def use_tf32(device, dtype):
    """fp32 on a CUDA card: let its matmuls and convolutions use TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation), as PyTorch did by default before 1.12. A no-op on CPU."""
    import torch
    if str(device).startswith("cuda") and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
